"""Distillation methods (CAKE/LAKE, MEKD, TA-DFKD), one module each."""
