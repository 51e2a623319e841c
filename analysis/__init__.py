"""Analysis of results/ (tables and figures with rliable); installed as mowbench.analysis."""
