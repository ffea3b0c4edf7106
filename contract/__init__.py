"""byolkit's contract: what training, export, serving and the app agree on, importable without torch
(numpy and Pillow only) and without the trainer package.

- contract.preprocess: how an image becomes the encoder's input (decode, resize, centre crop,
  normalise), the same in training, evaluation, export, serving and the app.
- contract.deployment: the tensor names, the model name and the metadata every exported
  artefact, server and client use.
- contract.errors: the two errors every byolkit command reports as one `error:` line (exit 2).
"""
