"""unlearn: does your unlearning method really forget? Scored as the NeurIPS 2023 challenge did."""

__version__ = "0.1.0"
