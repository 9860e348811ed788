/* Optional accelerator for the model check's judgement (equivcheck/modelcheck/judge.py).
 *
 * One pass over a (rows, cols) block of float32 outputs computes what the numpy path computes in
 * about fifteen: the bound 2u(|r - b| + |r|) + growth*m + floor per element, |a - r| against it, and
 * the worst ratio (its first flat index, the bound there), the count over 1, the largest error and
 * the largest relative error. Every operation is the same float32 operation in the same order as
 * numpy's (built with -ffp-contract=off: no fused multiply-add), so both paths give the same bits.
 * The arrays may have any strides (a channels-last map moved to channels first is read as it
 * lies): the block is walked in tiles of columns, each tile row by row, so a strided array's cache
 * lines are reused across the rows of a tile. A non-finite output, reference or bound ends the pass
 * with None: the numpy path judges that block. Plain C, no numpy headers: buffers come through the
 * buffer protocol; the GIL is released, so threads can judge blocks side by side.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

static int float32_2d(PyObject *obj, Py_buffer *view, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDES | PyBUF_FORMAT) < 0) return -1;
    if (view->ndim != 2 || view->itemsize != 4 || view->format == NULL || strcmp(view->format, "f") != 0) {
        PyErr_Format(PyExc_ValueError, "%s must be a 2-D float32 array", name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

#define NEAR (1.0 - 1.0 / (1 << 20))  /* below 1 - 2^-24, with room for the double product's rounding */
#define AT(v, i, j) (*(const float *)((const char *)(v).buf + (i) * (v).strides[0] + (j) * (v).strides[1]))

static PyObject *judge_float32(PyObject *self, PyObject *args) {
    PyObject *r_obj, *a_obj, *m_obj, *b_obj;
    float two_u, growth, floor_;
    Py_ssize_t tile;
    Py_buffer r, a, m, b;
    if (!PyArg_ParseTuple(args, "OOOOfffn", &r_obj, &a_obj, &m_obj, &b_obj, &two_u, &growth, &floor_, &tile))
        return NULL;
    if (float32_2d(r_obj, &r, "reference") < 0) return NULL;
    if (float32_2d(a_obj, &a, "actual") < 0) { PyBuffer_Release(&r); return NULL; }
    if (float32_2d(m_obj, &m, "magnitude") < 0) { PyBuffer_Release(&r); PyBuffer_Release(&a); return NULL; }
    int has_bias = b_obj != Py_None;
    if (has_bias && PyObject_GetBuffer(b_obj, &b, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&r); PyBuffer_Release(&a); PyBuffer_Release(&m);
        return NULL;
    }
    Py_ssize_t rows = r.shape[0], cols = r.shape[1];
    int ok = a.shape[0] == rows && a.shape[1] == cols && m.shape[0] == rows && m.shape[1] == cols && tile > 0 &&
             (!has_bias || (b.itemsize == 4 && b.format && strcmp(b.format, "f") == 0 && b.len == rows * 4));
    int finite = 1;
    float worst = -1.0f, bound_at = 0.0f, top = 0.0f, rel = -1.0f;  /* rel < 0: every quotient was 0/0 */
    Py_ssize_t at = 0, count = 0;
    if (ok) {
        const float *bias = has_bias ? (const float *)b.buf : NULL;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j0 = 0; j0 < cols && finite; j0 += tile) {
            Py_ssize_t j1 = j0 + tile < cols ? j0 + tile : cols;
            for (Py_ssize_t i = 0; i < rows && finite; i++) {
                for (Py_ssize_t j = j0; j < j1; j++) {
                    float rv = AT(r, i, j), av = AT(a, i, j), mv = AT(m, i, j);
                    float absr = fabsf(rv);
                    float bound = bias ? fabsf(rv - bias[i]) : absr;
                    bound = bound + absr;
                    bound = bound * two_u;
                    bound = bound + mv * growth;
                    bound = bound + floor_;
                    float err = fabsf(av - rv);
                    if (!isfinite(err) || !(bound >= 0.0f)) { finite = 0; break; }
                    /* A quotient is rounded only where it may matter: err/bound rounds to >= worst only if
                     * err >= worst*bound*(1 - 2^-24) exactly (products of two floats are exact in double). */
                    if ((double)err >= (double)worst * bound * NEAR) {
                        float ratio = err / bound;
                        if (isnan(ratio)) { finite = 0; break; }  /* 0/0: numpy's argmax takes the NaN */
                        Py_ssize_t flat = i * cols + j;
                        if (ratio > worst || (ratio == worst && flat < at)) {
                            worst = ratio; at = flat; bound_at = bound;
                        }
                    }
                    if (err > bound) count += err / bound > 1.0f;
                    if (err > top) top = err;
                    if ((double)err >= (double)rel * absr * NEAR) {
                        float q = err / absr;  /* 0/0: NaN, passed over as numpy's fmax passes over it */
                        if (q > rel) rel = q;
                    }
                }
            }
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&r); PyBuffer_Release(&a); PyBuffer_Release(&m);
    if (has_bias) PyBuffer_Release(&b);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "reference, actual and magnitude must have one shape, the bias one float32 "
                                          "per row, the tile positive");
        return NULL;
    }
    if (!finite) Py_RETURN_NONE;
    return Py_BuildValue("(dndndd)", (double)worst, at, (double)bound_at, count, (double)top, rel < 0 ? NAN : (double)rel);
}

static PyMethodDef methods[] = {
    {"judge_float32", judge_float32, METH_VARARGS,
     "judge_float32(reference, actual, magnitude, bias, two_u, growth, floor, tile) -> (worst ratio, its flat index, "
     "the bound there, outputs over their bound, largest error, largest relative error), or None on a non-finite value"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastjudge", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastjudge(void) { return PyModule_Create(&module); }
