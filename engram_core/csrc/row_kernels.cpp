// CPU kernels of the serving overlay's kernel form (engram_core/row_overlay.py, _KernelMap).
//
// A request batch marks (mark), in a zeroed (sequences x rows) int32 index, each row its
// sequence's user wrote: index[b, row] = j + 1 for the user's j-th written row, and keeps the
// users' arrays in a Marks object (their pointers parsed once). A forward then reads every
// (sequence, position) row in one pass: the table's row, plus the user's fp16 value where the
// index says so. No copy of the table and no per-batch copy of the values: the values are read
// where the index points, from the user's own arrays. The arithmetic is the add form's, so the
// bits are the same: the fp16 value is rounded to the table's dtype first (exact for fp32), and
// the sum is computed in float and rounded once to the table's dtype.
//
// Compiled on first use by engram_core/row_kernels.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <pybind11/numpy.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <cstdint>
#include <cstring>
#include <vector>

namespace py = pybind11;

namespace {

// A C-contiguous NumPy array of ``ndim`` dimensions and the given kind and item size (and, for
// 2-D, ``width`` columns), or null.
const void* array_data(const py::handle& obj, int ndim, char kind, py::ssize_t itemsize, py::ssize_t* rows,
                       py::ssize_t width = -1) {
  if (!py::isinstance<py::array>(obj)) return nullptr;
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (a.ndim() != ndim || a.dtype().kind() != kind || a.itemsize() != itemsize || !(a.flags() & py::array::c_style))
    return nullptr;
  if (ndim == 2 && a.shape(1) != width) return nullptr;
  *rows = a.shape(0);
  return a.data();
}

void check_index(const torch::Tensor& index) {
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kInt && index.dim() == 2 && index.is_contiguous(),
              "index must be a contiguous CPU int32 (sequences x rows) tensor");
}

}  // namespace

// A request batch's marks in its index, and the users' arrays they point into (held here).
struct Marks {
  torch::Tensor index;  // (B, R) int32
  std::vector<const int64_t*> rows;  // per sequence, null: none
  std::vector<const at::Half*> values;
  std::vector<int64_t> counts;
  int64_t width = 0;
  py::list keep;  // the arrays themselves, alive as long as these pointers
  bool marked = true;

  // Every marked entry back to 0 (the index can go back to a pool); idempotent.
  void clear() {
    if (!marked) return;
    const int64_t R = index.size(1);
    int32_t* out = index.data_ptr<int32_t>();
    for (size_t b = 0; b < rows.size(); ++b)
      for (int64_t j = 0; j < counts[b]; ++j) out[static_cast<int64_t>(b) * R + rows[b][j]] = 0;
    marked = false;
  }
};

// Mark each sequence b's rows in a zeroed (sequences x rows) index: index[b, rows[b][j]] = j + 1
// (None: nothing written). Every sequence's rows must be a 1-D int64 and its values a
// (k x width) float16 C-contiguous NumPy array: otherwise nothing is written and None is
// returned (the caller builds another form). A row out of range raises, before any write.
std::unique_ptr<Marks> mark(torch::Tensor index, const py::list& rows, const py::list& values, int64_t width) {
  check_index(index);
  const int64_t B = index.size(0), R = index.size(1);
  const size_t n = rows.size();
  TORCH_CHECK(static_cast<int64_t>(n) <= B, "more sequences (", n, ") than the index has (", B, ")");
  TORCH_CHECK(values.size() == n, "rows and values of different numbers of sequences");
  auto marks = std::make_unique<Marks>();
  marks->index = index;
  marks->width = width;
  marks->rows.assign(B, nullptr);
  marks->values.assign(B, nullptr);
  marks->counts.assign(B, 0);
  for (size_t b = 0; b < n; ++b) {
    if (rows[b].is_none()) continue;
    py::ssize_t k = 0, kv = -1;
    const auto* r = static_cast<const int64_t*>(array_data(rows[b], 1, 'i', 8, &k));
    const auto* v = static_cast<const at::Half*>(array_data(values[b], 2, 'f', 2, &kv, width));
    if (r == nullptr || v == nullptr || k != kv) return nullptr;
    TORCH_CHECK(k < INT32_MAX, "sequence ", b, " writes too many rows");
    for (py::ssize_t j = 0; j < k; ++j)
      TORCH_CHECK(r[j] >= 0 && r[j] < R, "sequence ", b, ": row ", r[j], " out of range [0, ", R, ")");
    marks->rows[b] = r;
    marks->values[b] = v;
    marks->counts[b] = k;
  }
  marks->keep.append(rows);
  marks->keep.append(values);
  int32_t* out = index.data_ptr<int32_t>();
  for (size_t b = 0; b < n; ++b)
    for (int64_t j = 0; j < marks->counts[b]; ++j)
      out[static_cast<int64_t>(b) * R + marks->rows[b][j]] = static_cast<int32_t>(j + 1);
  return marks;
}

template <typename T>
static void read_impl(const torch::Tensor& table, const torch::Tensor& rows, const Marks& marks, torch::Tensor& out) {
  const int64_t B = rows.size(0), M = rows.size(1), R = table.size(0), w = table.size(1);
  const T* tab = table.data_ptr<T>();
  const int64_t* query = rows.data_ptr<int64_t>();
  const int32_t* idx = marks.index.data_ptr<int32_t>();
  T* dst = out.data_ptr<T>();
  std::atomic<bool> bad_row{false}, bad_mark{false};
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(M, 1));  // sequences per task
  at::parallel_for(0, B, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int32_t* marked = idx + b * R;
      const at::Half* values = marks.values[b];
      const int64_t count = marks.counts[b];
      for (int64_t m = 0; m < M; ++m) {
        const int64_t i = b * M + m, r = query[i];
        if (static_cast<uint64_t>(r) >= static_cast<uint64_t>(R)) {  // rows come from the model's hashing; checked anyway
          bad_row = true;
          continue;
        }
        const T* src = tab + r * w;
        T* o = dst + i * w;
        const int32_t k = marked[r];
        if (k == 0) {
          for (int64_t j = 0; j < w; ++j) o[j] = src[j];
        } else if (k <= count) {
          const at::Half* v = values + static_cast<int64_t>(k - 1) * w;
          for (int64_t j = 0; j < w; ++j)
            o[j] = static_cast<T>(static_cast<float>(src[j]) + static_cast<float>(static_cast<T>(static_cast<float>(v[j]))));
        } else {
          bad_mark = true;
        }
      }
    }
  });
  TORCH_CHECK(!bad_row, "row out of range [0, ", R, ")");
  TORCH_CHECK(!bad_mark, "the index holds marks beyond a sequence's values");
}

// The rows (B, M, w) of ``table`` at ``rows`` (B, M, int64), each sequence plus its user's
// values where ``marks`` marked them.
torch::Tensor read_rows(const torch::Tensor& table, const torch::Tensor& rows, const Marks& marks) {
  TORCH_CHECK(marks.marked, "these marks were cleared");
  TORCH_CHECK(table.device().is_cpu() && table.dim() == 2 && table.is_contiguous(), "table must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.dim() == 2 && rows.is_contiguous(),
              "rows must be a contiguous CPU int64 (sequences x positions) tensor");
  const int64_t B = rows.size(0), R = table.size(0), w = table.size(1);
  TORCH_CHECK(marks.index.size(0) == B && marks.index.size(1) == R, "marks are for ", marks.index.size(0), " x ",
              marks.index.size(1), ", rows are ", B, " sequences of a ", R, "-row table");
  TORCH_CHECK(marks.width == w, "values are ", marks.width, " wide, the table's rows ", w);
  auto out = torch::empty({B, rows.size(1), w}, table.options());
  switch (table.scalar_type()) {
    case at::kFloat: read_impl<float>(table, rows, marks, out); break;
    case at::kBFloat16: read_impl<at::BFloat16>(table, rows, marks, out); break;
    case at::kHalf: read_impl<at::Half>(table, rows, marks, out); break;
    default: TORCH_CHECK(false, "table dtype ", table.scalar_type(), " is not float32, bfloat16 or float16");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Marks>(m, "Marks").def("clear", &Marks::clear, "Unmark the index (idempotent).");
  m.def("mark", &mark, "Mark each sequence's written rows in a zeroed index (None: not int64 / float16 NumPy parts).",
        py::arg("index"), py::arg("rows"), py::arg("values"), py::arg("width"));
  m.def("read_rows", &read_rows, "Rows of the table, each sequence plus its user's marked values.");
}
