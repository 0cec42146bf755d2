"""The K-FAC / SP-NGD optimizer: layers and factors, inverses, preconditioner, strategies.

>>> precond = KFACPreconditioner(model, damping=1e-3, lr=0.1)
>>> loss.backward(); precond.step(); optimizer.step()
"""
from kfacperf.kfac.batchnorm import BatchNormLayer
from kfacperf.kfac.layers import Conv2dLayer, KFACLayer, LinearLayer
from kfacperf.kfac.preconditioner import KFACPreconditioner
from kfacperf.kfac.strategy import LocalStrategy, Strategy

__all__ = [
    "BatchNormLayer",
    "Conv2dLayer",
    "KFACLayer",
    "KFACPreconditioner",
    "LinearLayer",
    "LocalStrategy",
    "Strategy",
]
