"""The method core, pure PyTorch (never imports ray): backbone split, feature statistics, memories,
mixing, samplers, losses, and the training methods (TALLY and baselines)."""

from tally.method.backbone import SplitResNet
from tally.method.memory import FeatureMemory
from tally.method.methods import METHODS, Method, TrainInfo, build_method, method_defaults
from tally.method.samplers import (
    ClassBalancedSampler,
    DomainBalancedSampler,
    UniformSampler,
    build_sampler,
)
from tally.method.stats import feature_stats, mix, sample_lambdas

__all__ = [
    "METHODS",
    "ClassBalancedSampler",
    "DomainBalancedSampler",
    "FeatureMemory",
    "Method",
    "SplitResNet",
    "TrainInfo",
    "UniformSampler",
    "build_method",
    "build_sampler",
    "feature_stats",
    "method_defaults",
    "mix",
    "sample_lambdas",
]
