"""Studies that test the notes' claims on real runs: the laws of scale (``lmforge study scaling``) and
emergence against the metric (``lmforge study emergence``), both over one ladder of sizes and budgets."""
