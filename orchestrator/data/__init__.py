"""Datasets for the pipeline (layer 1, no Ray): the dataset listing and its checks (`layout`), the
digits demo set, image decoding and transforms, in-process torch datasets, the Parquet converter.
The ray.data pipeline over the same listing is layer 2: `orchestrator.distributed.datasets`.
"""
