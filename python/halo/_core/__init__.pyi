# Stubs of the compiled module halo._core: one file per area submodule.
from . import backend as backend
from . import core as core
from . import cuda as cuda
from . import edge as edge
from . import edge_store as edge_store
from . import gguf as gguf
from . import hwq as hwq
from . import io as io
from . import lora as lora
from . import optim as optim
from . import quant as quant
from . import sched as sched
