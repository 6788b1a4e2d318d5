"""Ops: each file holds a public function, its pure-PyTorch reference and the dispatch to fast kernels."""
