"""Fine-tuning an encoder for dense tasks, in the style of torchvision's references: one module per task
(detect: Faster/Mask R-CNN; segment: FCN/DeepLabV3; depth: Laina et al.'s up-projection) that owns its
data, head, metrics and loop, over `common` (the backbone, the deterministic epoch order, the run
checkpoint, drawing). The commands keep their documented names: `python -m trainer.detect`, ...
"""
