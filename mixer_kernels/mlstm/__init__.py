"""mLSTM (xLSTM-7B) ops: chunkwise (Triton on CUDA, PyTorch otherwise), recurrent step, parallel.

`reference.py` is the readable PyTorch spec, `triton.py` the chunkwise Triton kernel (forward and
backward), `dispatch.py` picks one per call (mixer_kernels/backend.py).
"""

from mixer_kernels.mlstm.dispatch import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent_step
from mixer_kernels.mlstm.reference import MLSTMState, zero_state

__all__ = ["MLSTMState", "mlstm_chunkwise", "mlstm_parallel", "mlstm_recurrent_step", "zero_state"]
