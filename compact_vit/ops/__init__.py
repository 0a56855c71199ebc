"""Shape-static building blocks shared by the model families (LSH attention, reversible stacks)."""
