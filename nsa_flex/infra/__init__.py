from .parallelize import parallelize_nsa

__all__ = ["parallelize_nsa"]
