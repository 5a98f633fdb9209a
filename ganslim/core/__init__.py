"""The machinery every strategy builds on: coupled channel groups (``targeting``), gates and their
export (``gating``), GAN Slimming's controller (``slimming``), feature distillation (``distill``), the
training loop (``train``) with its tensor layout (``memory_format``) and arithmetic (``precision``),
torchrun helpers (``distributed``) and the genetic loop (``genetic``)."""
