"""Integrations with the Hugging Face / DeepSpeed stack. Each submodule imports its library; importing
``zeroadamw`` never does.

* :mod:`zeroadamw.integrations.hf` -- ``ZeroTrainerMixin`` / ``ZeroTrainer`` for ``transformers.Trainer`` (and TRL).
* :mod:`zeroadamw.integrations.accelerate` -- ``prepare(accelerator, ...)`` for plain Accelerate loops.
* :mod:`zeroadamw.integrations.deepspeed` -- the client optimizer to hand to ``deepspeed.initialize``.
"""
