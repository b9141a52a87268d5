"""investment-risk: eight calibrated capital-preservation risk scores per news article."""

__version__ = "0.1.0"
