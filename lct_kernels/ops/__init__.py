"""Per-op modules: torch reference, torch.library registration, dispatch."""
