"""Loss functions: pure functions of tensors, no model or training code."""
