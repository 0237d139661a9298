"""mctlib: Matching Convexified Trajectory dataset distillation (Zhong et al., CVPR 2025)."""

__version__ = "0.1.0"
