//! The DINOv2 method: Sinkhorn-Knopp, DINO, iBOT and KoLeo losses, masking, one training step.
