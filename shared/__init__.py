"""fedshop: federated DP-LoRA T5 for shopper behaviour."""
