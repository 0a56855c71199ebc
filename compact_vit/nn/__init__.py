"""Shape-static building blocks shared by every model family.

`layers` (dense/conv/norm helpers, Mlp, DropPath, attention, ViT blocks, settings checks), `tokens`
(masked attention and token selection for token reduction), `lsh_attention` (Reformer's LSH
attention), `reversible` (reversible residual stacks, chunked feed-forward). This package imports
nothing else of compact_vit but `compact_vit.errors`.
"""
