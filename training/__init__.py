"""The pieces train.py strings together (paper Sec. 5.2, Supp. A.4; docs/design.md sections 3-5):
its command line (args), the run's models and optimizer (build), the presets, the objective and
learning-rate schedule, the non-finite guard, the step log, checkpoint files, the weight average, the
validation grid, the processes (distributed), and the tiny stack's pre-training (pretrain)."""
