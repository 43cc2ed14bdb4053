"""Names of the built-in models, importable without torch.

Config validation runs in every ClientApp process (in deployment a fresh one per message);
it must not pay torch's import for messages that never train.
"""

#: Values accepted by `task.model` (besides "auto" for task=hf).
MODEL_NAMES: tuple[str, ...] = (
    "digits_cnn",
    "digits_cnn_small",
    "digits_linear",
    "tabular_mlp",
    "image_cnn",
    "resnet18_gn",
)
