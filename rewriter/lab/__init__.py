"""Model tools around the rewrite: measure, analyze, evaluate, example models, demo."""
