"""Layer 1: what a model is: building one (torchvision name or a user's `module:callable`), its layers
and every multiply traced from a forward pass (`info`), importing a user's module (`user_module`),
attention made explicit (`explicit_layers`), and one step of every stage in-process (`check`)."""
