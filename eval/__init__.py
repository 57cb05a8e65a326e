"""Evaluation: CLIP-I, CLIP-T, VQA score and Similarity Weighted Diversity (DESIGN.md section 6)."""
