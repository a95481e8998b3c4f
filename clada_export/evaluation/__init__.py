"""Task accuracy and the side-by-side comparison of sparsity methods (issue 11)."""
