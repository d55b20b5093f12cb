"""Training: the toy world, teacher tuning, ODE init and DMD distillation."""
