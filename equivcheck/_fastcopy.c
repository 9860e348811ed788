/* Optional accelerator for equivcheck.Mapping.apply on numpy arrays.
 *
 * Cache-blocked "gather rows, then transpose": out[l, c0 + j] = src[rows[j], l].
 * The dense -> conv weight mapping is a 2-D transpose whose rows are permuted (and flipped).
 * numpy can only copy such a view element by element with large jumps; this kernel copies
 * 16 source row pieces of 64 elements into a small tile (contiguous reads) and writes the
 * tile out column by column (16 contiguous elements per output row), so both sides stay in
 * cache. Plain C, no numpy headers: buffers come through the buffer protocol; the GIL is
 * released while copying, so two threads can split the columns. When this module is not
 * built, equivcheck/_arrays.py does the same in numpy, about twice as slowly.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TJ 16
#define TL 64

#define KERNEL(T)                                                                         \
    static void gather_T_##T(const T *src, Py_ssize_t width, const int64_t *rows,          \
                             Py_ssize_t n, T *dst, Py_ssize_t dst_cols, Py_ssize_t c0) {   \
        T tile[TJ][TL];                                                                   \
        for (Py_ssize_t j0 = 0; j0 < n; j0 += TJ) {                                       \
            Py_ssize_t nj = j0 + TJ < n ? TJ : n - j0;                                    \
            for (Py_ssize_t l0 = 0; l0 < width; l0 += TL) {                               \
                Py_ssize_t nl = l0 + TL < width ? TL : width - l0;                        \
                for (Py_ssize_t j = 0; j < nj; j++)                                       \
                    memcpy(tile[j], src + rows[j0 + j] * width + l0, nl * sizeof(T));     \
                if (nj == TJ) {                                                           \
                    for (Py_ssize_t l = 0; l < nl; l++) {                                 \
                        T *out = dst + (l0 + l) * dst_cols + c0 + j0;                     \
                        for (Py_ssize_t j = 0; j < TJ; j++) out[j] = tile[j][l];          \
                    }                                                                     \
                } else {                                                                  \
                    for (Py_ssize_t l = 0; l < nl; l++) {                                 \
                        T *out = dst + (l0 + l) * dst_cols + c0 + j0;                     \
                        for (Py_ssize_t j = 0; j < nj; j++) out[j] = tile[j][l];          \
                    }                                                                     \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
    }

KERNEL(uint8_t)
KERNEL(uint16_t)
KERNEL(uint32_t)
KERNEL(uint64_t)

static PyObject *gather_transpose(PyObject *self, PyObject *args) {
    Py_buffer src, rows, dst;
    Py_ssize_t width, dst_cols, c0, itemsize;
    if (!PyArg_ParseTuple(args, "y*ny*w*nnn", &src, &width, &rows, &dst, &dst_cols, &c0, &itemsize))
        return NULL;
    Py_ssize_t n = rows.len / (Py_ssize_t)sizeof(int64_t);
    int ok = width > 0 && itemsize > 0 && src.len % (width * itemsize) == 0 &&
             dst.len >= width * dst_cols * itemsize && c0 >= 0 && c0 + n <= dst_cols;
    const int64_t *r = (const int64_t *)rows.buf;
    Py_ssize_t height = ok ? src.len / (width * itemsize) : 0;
    for (Py_ssize_t j = 0; ok && j < n; j++)
        ok = r[j] >= 0 && r[j] < height;
    if (!ok) {
        PyBuffer_Release(&src); PyBuffer_Release(&rows); PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "gather_transpose: buffer sizes or row indices out of range");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (itemsize) {
    case 1: gather_T_uint8_t(src.buf, width, r, n, dst.buf, dst_cols, c0); break;
    case 2: gather_T_uint16_t(src.buf, width, r, n, dst.buf, dst_cols, c0); break;
    case 4: gather_T_uint32_t(src.buf, width, r, n, dst.buf, dst_cols, c0); break;
    case 8: gather_T_uint64_t(src.buf, width, r, n, dst.buf, dst_cols, c0); break;
    default: ok = 0;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src); PyBuffer_Release(&rows); PyBuffer_Release(&dst);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "gather_transpose: itemsize must be 1, 2, 4 or 8");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gather_transpose", gather_transpose, METH_VARARGS,
     "gather_transpose(src, width, rows, dst, dst_cols, col0, itemsize): dst[l, col0 + j] = src[rows[j], l]"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcopy", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastcopy(void) { return PyModule_Create(&module); }
