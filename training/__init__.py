"""The pieces train.py strings together (paper Sec. 5.2, Supp. A.4; docs/design.md sections 3-5):
presets, the objective and learning-rate schedule, checkpoint files, the validation grid."""
