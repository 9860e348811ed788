/* Optional accelerator for equivcheck.Mapping.apply on numpy arrays.
 *
 * Cache-blocked "gather rows, then transpose": out[l, c0 + j] = src[rows[j], l].
 * The dense -> conv weight mapping is a 2-D transpose whose rows are permuted (and flipped).
 * numpy can only copy such a view element by element with large jumps; this kernel copies
 * 16 source row pieces of 64 elements into a small tile (contiguous reads) and writes the
 * tile out column by column (16 contiguous elements per output row), so both sides stay in
 * cache. Plain C, no numpy headers: buffers come through the buffer protocol; the GIL is
 * released while copying, so two threads can split the columns. Buffers must be C-contiguous
 * plain unsigned integers of the item size (the caller passes uint views of numeric arrays), so
 * object pointers never reach a memcpy. The module keeps no threads or state: the Python pool
 * that calls it is re-created after fork. When this module is not built, equivcheck/_copy.py
 * does the same in numpy, about twice as slowly.
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

/* Borrow a C-contiguous buffer of single plain integers (format one of `codes`, `itemsize` bytes each).
 * The kernels copy bytes, so they must never see object pointers (which carry reference counts),
 * structured records or anything else numpy could export: the caller passes uint views. */
static int get_plain(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize, const char *codes,
                     const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=')
        f++;
    if (view->itemsize != itemsize || strlen(f) != 1 || strchr(codes, *f) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: expected a buffer of %zd-byte plain integers (format in '%s'), got format=%s itemsize=%zd",
                     what, itemsize, codes, view->format ? view->format : "B", view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* src (read), rows (int64) and dst (written) for one call, or -1 with an exception set. */
static int get_three(PyObject *s, PyObject *r, PyObject *d, Py_ssize_t itemsize, Py_buffer *src, Py_buffer *rows,
                     Py_buffer *dst, const char *what) {
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "%s: itemsize must be 1, 2, 4 or 8", what);
        return -1;
    }
    if (get_plain(s, src, 0, itemsize, "BHILQ", what) < 0)
        return -1;
    if (get_plain(r, rows, 0, 8, "lq", what) < 0) {
        PyBuffer_Release(src);
        return -1;
    }
    if (get_plain(d, dst, 1, itemsize, "BHILQ", what) < 0) {
        PyBuffer_Release(src);
        PyBuffer_Release(rows);
        return -1;
    }
    return 0;
}

static void release_three(Py_buffer *src, Py_buffer *rows, Py_buffer *dst) {
    PyBuffer_Release(src);
    PyBuffer_Release(rows);
    PyBuffer_Release(dst);
}

static PyObject *gather_transpose(PyObject *self, PyObject *args) {
    PyObject *s, *r_obj, *d;
    Py_buffer src, rows, dst;
    Py_ssize_t width, dst_cols, c0, itemsize;
    if (!PyArg_ParseTuple(args, "OnOOnnn", &s, &width, &r_obj, &d, &dst_cols, &c0, &itemsize))
        return NULL;
    if (get_three(s, r_obj, d, itemsize, &src, &rows, &dst, "gather_transpose") < 0)
        return NULL;
    Py_ssize_t n = rows.len / (Py_ssize_t)sizeof(int64_t);
    int ok = width > 0 && src.len % (width * itemsize) == 0 && dst_cols >= 0 &&
             dst.len >= width * dst_cols * itemsize && c0 >= 0 && c0 + n <= dst_cols;
    const int64_t *r = (const int64_t *)rows.buf;
    Py_ssize_t height = ok ? src.len / (width * itemsize) : 0;
    for (Py_ssize_t j = 0; ok && j < n; j++)
        ok = r[j] >= 0 && r[j] < height;
    if (!ok) {
        release_three(&src, &rows, &dst);
        PyErr_SetString(PyExc_ValueError, "gather_transpose: buffer sizes or row indices out of range");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (itemsize) {
    case 1: gather_T_uint8_t(src.buf, width, r, n, dst.buf, dst_cols, c0); break;
    case 2: gather_T_uint16_t(src.buf, width, r, n, dst.buf, dst_cols, c0); break;
    case 4: gather_T_uint32_t(src.buf, width, r, n, dst.buf, dst_cols, c0); break;
    default: gather_T_uint64_t(src.buf, width, r, n, dst.buf, dst_cols, c0); break;
    }
    Py_END_ALLOW_THREADS
    release_three(&src, &rows, &dst);
    Py_RETURN_NONE;
}

static PyObject *scatter_transpose(PyObject *self, PyObject *args) {
    PyObject *s, *r_obj, *d;
    Py_buffer src, rows, dst;
    Py_ssize_t width, c0, itemsize;
    if (!PyArg_ParseTuple(args, "OnOOnn", &s, &width, &r_obj, &d, &c0, &itemsize))
        return NULL;
    if (get_three(s, r_obj, d, itemsize, &src, &rows, &dst, "scatter_transpose") < 0)
        return NULL;
    Py_ssize_t n = rows.len / (Py_ssize_t)sizeof(int64_t);
    int ok = width > 0 && src.len % (width * itemsize) == 0 && c0 >= 0 && c0 + n <= width;
    Py_ssize_t height = ok ? src.len / (width * itemsize) : 0;
    Py_ssize_t out_rows = ok && height ? dst.len / (height * itemsize) : 0;
    const int64_t *r = (const int64_t *)rows.buf;
    for (Py_ssize_t j = 0; ok && j < n; j++)
        ok = r[j] >= 0 && r[j] < out_rows;
    if (!ok) {
        release_three(&src, &rows, &dst);
        PyErr_SetString(PyExc_ValueError, "scatter_transpose: buffer sizes or row indices out of range");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (itemsize) {
    case 1: scatter_T_uint8_t(src.buf, width, height, r, n, dst.buf, c0); break;
    case 2: scatter_T_uint16_t(src.buf, width, height, r, n, dst.buf, c0); break;
    case 4: scatter_T_uint32_t(src.buf, width, height, r, n, dst.buf, c0); break;
    default: scatter_T_uint64_t(src.buf, width, height, r, n, dst.buf, c0); break;
    }
    Py_END_ALLOW_THREADS
    release_three(&src, &rows, &dst);
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
