"""Training: SFT and RLVR on top of TRL and PEFT."""
