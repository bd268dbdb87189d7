"""Layer 2: the method's stages run on Ray Train / Tune / Data, recorded in MLflow."""
