"""Layer 1: training of the FP, joint indicator and fine-tuning stages in plain torch (stages, recipes,
steps, the epoch loop, checkpoints, one-shot scoring); Ray Train drives them from
orchestrator.distributed.train."""
