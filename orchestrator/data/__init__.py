"""Datasets for the pipeline: the digits demo set, image transforms, in-process torch datasets
(layer 1) and the ray.data pipeline (layer 2, `orchestrator.data.ray_pipeline`, imported on demand).
"""
