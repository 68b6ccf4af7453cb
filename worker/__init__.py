"""Workers: claim jobs from the queue and write their event logs."""
