"""The numerical runtime: the functions NumPy lacks that generated modules call.

Ordinary modules, grouped by concern, each opening with its contract: :mod:`.stable` (sigmoid
and softplus without overflow), :mod:`.special` (erf and erfc), :mod:`.rows` (passes along
the rows of a 2-D array), :mod:`.windows` (sliding windows and their col2im scatters),
:mod:`.pooling` (max pooling's kernels), :mod:`.products` (tensordot as BLAS products, over
windows too), :mod:`.targets` (class labels as one-hot rows) and :mod:`.threads`
(``set_threads`` and the parts the array helpers run in).

They import NumPy and the standard library only, and nothing from the rest of symbp: a generated
module is one NumPy-only file, and it holds copies of the helpers it calls, taken from these
modules' source by :mod:`.registry`, which also computes what each helper calls and imports.
The checker and ``symbp flow`` import the same functions (``_one_hot``) rather than retyping them.
"""
