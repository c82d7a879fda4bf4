"""Per-layer latency tables: the measured cost model behind ``latency:R`` budgets.

``cwhawq latency-table MODEL --target T [--rpc HOST:PORT --key K] --out table.json``

What is measured
    For every quantized layer the table holds the latency of that layer *alone*, compiled for the
    target (:func:`cwhawq.backends.tvm.compile_model`) from a one-layer ONNX model written by the
    exporter itself (:func:`cwhawq.export.export_onnx` on a one-layer PyTorch model with the layer's
    shape, stride, padding and groups), for each weight-bit mix on a grid of ratios:

    * weight bits fall into three storage classes (8: 8 and 6 bits, 4: 4 and 3 bits, 2: 2 bits);
      a layer's mix is the point (r8, r4, r2) of the simplex of class fractions, and the grid holds
      every point with coordinates that are multiples of ``1/grid`` (``grid=2``: pure 8, 4 and 2 and
      the three half/half mixes: 6 points; ``grid=4``: 15 points);
    * activation bits matter only through the number of int8 digits ``D`` the integer kernels
      store per activation value (1 or 2; see :meth:`cwhawq.kernels.problem.ActQuant.digits`), which follows from the
      layer's calibrated per-channel input ranges and the plan's activation bits (the pow2 scale
      exponents, :func:`cwhawq.quantizers.act_pow2_scales`). Both ``D`` are measured (only ``D=1``
      for single-channel inputs, which cannot need two); the layer's calibrated ranges are stored
      in the table so that :meth:`LatencyTable.predict` computes a plan's ``D`` exactly;
    * plus the layer in fp32 (the same one-layer model without quantization).

    Layers of equal shape (resnet20 repeats most of its 22) are measured once.

Prediction (``LatencyTable.predict(plan) -> seconds``)
    ``T(plan) = overhead + sum over layers of L(layer, mix, D)``, with ``L`` from :func:`mix_cost`:
    linear in the class fractions between the three pure points, plus the extra cost of every
    additional group of channels the mix creates (each storage class present is a separate kernel
    group), measured on the grid's mixed points of the same face of the simplex, and
    ``overhead = T_fp32_model - sum over layers of L_fp32(layer)``: the measured latency of the
    whole fp32 model compiled for the target minus its layers measured alone. It holds what is not
    a layer (normalisation, pooling, the unfused adds) and is *negative* when per-call costs
    that every single-layer measurement pays (a VM call, output allocation) outweigh it, so that
    ``T(plan) = T_fp32_model + sum (L_q - L_fp32)``: those costs cancel layer by layer.
    ``ratio(plan) = T(plan) / T_fp32_model`` is what a ``latency:R`` budget bounds.
    Every number is a median of 100 results of about 1 ms each (:mod:`cwhawq.bench`); a whole
    model (the fp32 model here, the plans of a prediction check), whose one call can last longer
    than the time slices of other processes on a shared CPU, is measured in three rounds spread
    over the build and its lowest median kept (on a dedicated board the rounds agree). Not modelled:
    ``free`` (non power-of-two) activation scales, which run the float fallback kernels (such a
    layer is priced as ``D=2``).

Cache
    Every measurement is a JSON file under ``$CWHAWQ_CACHE`` (default
    ``$XDG_CACHE_HOME/cwhawq/latency``, i.e. ``~/.cache/cwhawq/latency``), named by the SHA-256 of
    (layer shape, stride, padding, dilation, groups, activation sign, weight-bit counts per class,
    ``D``, batch, target JSON, where it was measured: ``local`` or the RPC key, and the tool
    version: cwhawq and TVM versions plus a hash of the exporter, quantizer, kernel and backend
    sources). A second table for the same model and target compiles and measures nothing.

For the search (:mod:`cwhawq.search`): ``table.ratio(plan)`` or the separable
``table.cost_model(infos)`` (a :class:`cwhawq.search.costs.LayerLatencyCost`), e.g.
``make_cost_model(parse_budget("latency:0.5"), infos, latency=LatencyTable.load(p).cost_model(infos))``.

Modules, by job: :mod:`.model` (bit classes, grid, interpolation, activation digits),
:mod:`.probes` (one-layer models of a layer shape, exported by the exporter), :mod:`.cache` (the
measurement cache), :mod:`.table` (:class:`LatencyTable`, prediction, the search's cost model),
:mod:`.build` (building a table, measuring plans and artifacts).
"""
from .build import WHOLE_MODEL_ROUNDS, build_table, measure_artifacts, measure_plans
from .cache import LatencyCache, default_cache_dir, tool_version
from .model import (BIT_CLASSES, DEFAULT_GRID, TABLE_FORMAT, TABLE_VERSION, LatencyError, act_digits, bit_class,
                    class_fractions, face_extras, grid_points, interpolate, mix_cost, point_counts)
from .probes import LayerShape, OneLayerExporter, _calibration, fp32_onnx, single_layer_module  # noqa: F401
from .table import LatencyTable, table_text

__all__ = ["LatencyError", "LatencyTable", "LatencyCache", "LayerShape", "OneLayerExporter", "build_table",
           "measure_plans", "measure_artifacts", "table_text", "fp32_onnx", "tool_version", "default_cache_dir",
           "single_layer_module", "bit_class", "class_fractions", "grid_points", "point_counts", "interpolate",
           "face_extras", "mix_cost", "act_digits", "BIT_CLASSES", "DEFAULT_GRID", "TABLE_FORMAT", "TABLE_VERSION",
           "WHOLE_MODEL_ROUNDS"]
