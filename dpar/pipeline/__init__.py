"""The DPAR pipeline around the model layer: token data sets (``data``), the embedded palette tokenizer
(``tokenizer``), checkpoints (``checkpoint``), config -> model construction (``builders``), the loss and patch
plumbing shared by training and evaluation (``objectives``) and the commands of ``python -m dpar``."""
