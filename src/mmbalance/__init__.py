"""mmbalance: balanced multimodal learning with every balancing method as a small strategy object."""

__version__ = "0.1.0"
