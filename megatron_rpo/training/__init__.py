"""Forward step and loss function for megatron's pipeline schedules, the trainer loop, checkpoints."""
