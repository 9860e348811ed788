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

/* The reverse direction: dst[rows[r - c0], l] = src[l, r] for r in [c0, c0 + n), src (height, width).
 * A tile reads 16 neighbouring source columns from 64 rows and writes 16 output rows of 64. */
#define SCATTER(T)                                                                        \
    static void scatter_T_##T(const T *src, Py_ssize_t width, Py_ssize_t height,           \
                              const int64_t *rows, Py_ssize_t n, T *dst, Py_ssize_t c0) {  \
        T tile[TJ][TL];                                                                   \
        for (Py_ssize_t r0 = 0; r0 < n; r0 += TJ) {                                       \
            Py_ssize_t nr = r0 + TJ < n ? TJ : n - r0;                                    \
            for (Py_ssize_t l0 = 0; l0 < height; l0 += TL) {                              \
                Py_ssize_t nl = l0 + TL < height ? TL : height - l0;                      \
                for (Py_ssize_t l = 0; l < nl; l++) {                                     \
                    const T *in = src + (l0 + l) * width + c0 + r0;                       \
                    for (Py_ssize_t r = 0; r < nr; r++) tile[r][l] = in[r];               \
                }                                                                         \
                for (Py_ssize_t r = 0; r < nr; r++)                                       \
                    memcpy(dst + rows[r0 + r] * height + l0, tile[r], nl * sizeof(T));    \
            }                                                                             \
        }                                                                                 \
    }

SCATTER(uint8_t)
SCATTER(uint16_t)
SCATTER(uint32_t)
SCATTER(uint64_t)

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

static PyObject *scatter_transpose(PyObject *self, PyObject *args) {
    Py_buffer src, rows, dst;
    Py_ssize_t width, c0, itemsize;
    if (!PyArg_ParseTuple(args, "y*ny*w*nn", &src, &width, &rows, &dst, &c0, &itemsize))
        return NULL;
    Py_ssize_t n = rows.len / (Py_ssize_t)sizeof(int64_t);
    int ok = width > 0 && itemsize > 0 && src.len % (width * itemsize) == 0 && c0 >= 0 && c0 + n <= width;
    Py_ssize_t height = ok ? src.len / (width * itemsize) : 0;
    Py_ssize_t out_rows = ok && height ? dst.len / (height * itemsize) : 0;
    const int64_t *r = (const int64_t *)rows.buf;
    for (Py_ssize_t j = 0; ok && j < n; j++)
        ok = r[j] >= 0 && r[j] < out_rows;
    if (!ok) {
        PyBuffer_Release(&src); PyBuffer_Release(&rows); PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "scatter_transpose: buffer sizes or row indices out of range");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (itemsize) {
    case 1: scatter_T_uint8_t(src.buf, width, height, r, n, dst.buf, c0); break;
    case 2: scatter_T_uint16_t(src.buf, width, height, r, n, dst.buf, c0); break;
    case 4: scatter_T_uint32_t(src.buf, width, height, r, n, dst.buf, c0); break;
    case 8: scatter_T_uint64_t(src.buf, width, height, r, n, dst.buf, c0); break;
    default: ok = 0;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src); PyBuffer_Release(&rows); PyBuffer_Release(&dst);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "scatter_transpose: itemsize must be 1, 2, 4 or 8");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"scatter_transpose", scatter_transpose, METH_VARARGS,
     "scatter_transpose(src, width, rows, dst, col0, itemsize): dst[rows[r - col0], l] = src[l, r]"},
    {"gather_transpose", gather_transpose, METH_VARARGS,
     "gather_transpose(src, width, rows, dst, dst_cols, col0, itemsize): dst[l, col0 + j] = src[rows[j], l]"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcopy", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastcopy(void) { return PyModule_Create(&module); }
