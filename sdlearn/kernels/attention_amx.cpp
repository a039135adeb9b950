// Attention for bfloat16 on CPUs with AMX: chapter 10's last rung.
//
// torch's fused CPU kernel hardly slows down with the head width at Stable
// Diffusion's outermost level (4096 tokens, heads of width 40): its time goes,
// most likely, to the scores rather than the products. q.k^T has only 40 terms
// per score, so a score is cheap to compute and, in comparison, dear to move.
// Its scores go through blocks of 256 x 512 floats (512 KB: in L2, not in L1)
// several times: written by the product, scaled, read for the maximum,
// exponentiated, written again in bfloat16, read by the second product.
//
// This kernel makes the blocks small enough for L1 instead: 16 queries at a
// time, the height of one AMX tile, against 512 keys. For each block of keys:
//   1. s = q k^T      AMX tiles, 16 keys at a time, stored to a 16 x 512 buffer;
//   2. p = exp2(s*c - m), the online softmax of flash attention, one pass for
//      the row maxima and one for exp2, the row sums and p in bfloat16;
//      c = scale * log2(e) folds the scale into the exponent's base;
//   3. o = o * exp2(m_old - m) + p v, AMX tiles again, o in float32.
// exp2 is a cubic on the fraction and a scalef for the integer part: its relative
// error (under 7.5e-5) is far below bfloat16's rounding of p (4e-3).
//
// Shapes: q (B, H, M, D), k and v (B, H, N, D), bfloat16, each with its last
// dimension contiguous; D even and at most 256, M a multiple of 16, N of 32.
// The output is (B, M, H, D) in memory, returned as its (B, H, M, D) view, so
// that merging the heads again costs no copy. sdlearn/kernels/__init__.py checks
// all of this before it calls the kernel and otherwise uses torch's.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kRows = 16;   // queries per block: one tile's height
constexpr int64_t kKeys = 512;  // keys per block: s is 32 KB and p 16 KB, in L1

// The layout `_tile_loadconfig` reads: each tile's rows and bytes per row.
struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux lends the AMX registers to a process that asks for them.
bool request_amx() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// Tiles:
//   tmm0, tmm7  C, 16 x 16 floats: scores, or two groups of 16 output columns
//   tmm1        C, 16 x dt floats: the last dt = D % 16 output columns
//   tmm2        A, 16 x 32 bfloat16: q's columns, or p's
//   tmm3        A, 16 x qt bfloat16: q's last qt = D % 32 columns
//   tmm4        B, 16 pairs x 16 columns: k^T or v, in pairs of rows (VNNI)
//   tmm5        B, qt/2 pairs x 16 columns: k^T's last qt rows
//   tmm6        B, 16 pairs x dt columns: v's last dt columns
void configure_tiles(int64_t qt, int64_t dt) {
  TileConfig cfg;
  auto set = [&](int tile, int rows, int colsb) {
    cfg.rows[tile] = rows;
    cfg.colsb[tile] = colsb;
  };
  set(0, 16, 64);
  set(2, 16, 64);
  set(4, 16, 64);
  set(7, 16, 64);
  if (qt > 0) {
    set(3, 16, qt * 2);
    set(5, qt / 2, 64);
  }
  if (dt > 0) {
    set(1, 16, dt * 4);
    set(6, 16, dt * 4);
  }
  _tile_loadconfig(&cfg);
}

// 2^t for 16 floats: 2^floor(t) * 2^frac(t), the latter a cubic on [0, 1), the
// minimax fit of 2^f's relative error (7.5e-5); sdlearn.kernels.EXP2_CUBIC holds
// the same four numbers, and exp_by_powers_of_two the same steps in PyTorch.
inline __m512 exp2_16(__m512 t) {
  const __m512 c0 = _mm512_set1_ps(0.99992514f), c1 = _mm512_set1_ps(0.69583404f),
               c2 = _mm512_set1_ps(0.2260669f), c3 = _mm512_set1_ps(0.07802422f);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  const __m512 poly = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_fmadd_ps(c3, f, c2), f, c1), f, c0);
  return _mm512_scalef_ps(poly, n);
}

at::Tensor amx_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         double scale) {
  static const bool granted = request_amx();
  TORCH_CHECK(granted, "amx_attention: the system did not grant the AMX registers");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "amx_attention: expected bfloat16 q, k and v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "amx_attention: expected 4-d q, k, v");
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), N = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == H && k.size(3) == D,
              "amx_attention: q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(),
              " do not fit together");
  TORCH_CHECK(D % 2 == 0 && D <= 256 && M % kRows == 0 && N % 32 == 0,
              "amx_attention: expected an even head width up to 256, queries in "
              "multiples of 16 and keys in multiples of 32; got q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "amx_attention: expected each head's vector contiguous");

  using bf16 = at::BFloat16;
  const int64_t qchunks = D / 32, qt = D % 32, dgroups = D / 16, dt = D % 16;
  const int64_t BH = B * H, nq = M / kRows, nkb = (N + kKeys - 1) / kKeys;

  // k^T and v in the pairs-of-rows layout the B tiles read:
  // kp[bh][group of 16 keys][pair of columns d][key][2], vp[bh][pair of keys][d][2]
  auto kp = at::empty({BH, N * D}, q.options());
  auto vp = at::empty({BH, N * D}, q.options());
  const auto* kd = reinterpret_cast<const uint16_t*>(k.data_ptr<bf16>());
  const auto* vd = reinterpret_cast<const uint16_t*>(v.data_ptr<bf16>());
  auto* kpd = reinterpret_cast<uint16_t*>(kp.data_ptr<bf16>());
  auto* vpd = reinterpret_cast<uint16_t*>(vp.data_ptr<bf16>());
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const uint16_t* ks = kd + b * k.stride(0) + h * k.stride(1);
      const uint16_t* vs = vd + b * v.stride(0) + h * v.stride(1);
      uint16_t* kt = kpd + bh * N * D;
      uint16_t* vt = vpd + bh * N * D;
      // k: a pair of columns is one 32-bit word, so each group of 16 keys is
      // a transpose of 16 x D/2 words (read with memcpy: k's rows need not
      // start on a word)
      for (int64_t g = 0; g < N / 16; ++g) {
        auto* kg = reinterpret_cast<uint32_t*>(kt + g * 16 * D);
        for (int64_t c = 0; c < 16; ++c) {
          const uint16_t* krow = ks + (g * 16 + c) * k.stride(2);
          for (int64_t w = 0; w < D / 2; ++w) std::memcpy(&kg[w * 16 + c], krow + 2 * w, 4);
        }
      }
      // v: two rows interleaved
      for (int64_t j = 0; j < N; j += 2) {
        const uint16_t* row0 = vs + j * v.stride(2);
        const uint16_t* row1 = row0 + v.stride(2);
        uint16_t* vg = vt + j * D;
        for (int64_t d = 0; d < D; ++d) {
          vg[d * 2] = row0[d];
          vg[d * 2 + 1] = row1[d];
        }
      }
    }
  });

  auto out = at::empty({B, M, H, D}, q.options());
  const auto* qd = q.data_ptr<bf16>();
  auto* od = out.data_ptr<bf16>();
  const int64_t q_row = q.stride(2), o_row = H * D;
  const float c = static_cast<float>(scale) * 1.4426950408889634f;  // log2(e)

  at::parallel_for(0, BH * nq, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float s[kRows * kKeys];
    alignas(64) uint16_t p[kRows * kKeys];
    alignas(64) float o[kRows * 256];
    float m[kRows], l[kRows];
    configure_tiles(qt, dt);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nq, b = bh / H, h = bh % H, row0 = (task % nq) * kRows;
      const bf16* qs = qd + b * q.stride(0) + h * q.stride(1) + row0 * q_row;
      const uint16_t* kt = kpd + bh * N * D;
      const uint16_t* vt = vpd + bh * N * D;
      std::fill(m, m + kRows, -INFINITY);
      std::fill(l, l + kRows, 0.f);
      std::fill(o, o + kRows * D, 0.f);
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int64_t keys = std::min(kKeys, N - kb * kKeys);

        // 1. s = q k^T, 16 keys at a time; q's tiles stay loaded when it has
        // at most 32 + qt columns (p's tiles take tmm2 in step 3)
        const bool q_stays = qchunks <= 1;
        if (q_stays && qchunks == 1) _tile_loadd(2, qs, q_row * 2);
        if (qt > 0) _tile_loadd(3, qs + qchunks * 32, q_row * 2);
        for (int64_t g = 0; g < keys / 16; ++g) {
          const uint16_t* kg = kt + (kb * kKeys / 16 + g) * D * 16;
          _tile_zero(0);
          for (int64_t ch = 0; ch < qchunks; ++ch) {
            if (!q_stays) _tile_loadd(2, qs + ch * 32, q_row * 2);
            _tile_loadd(4, kg + ch * 32 * 16, 64);
            _tile_dpbf16ps(0, 2, 4);
          }
          if (qt > 0) {
            _tile_loadd(5, kg + qchunks * 32 * 16, 64);
            _tile_dpbf16ps(0, 3, 5);
          }
          _tile_stored(0, s + g * 16, kKeys * 4);
        }

        // 2. the online softmax, in base 2: p, the new maxima and sums, o rescaled
        const __m512 vc = _mm512_set1_ps(c);
        for (int64_t r = 0; r < kRows; ++r) {
          const float* sr = s + r * kKeys;
          __m512 vmax = _mm512_loadu_ps(sr);
          for (int64_t j = 16; j < keys; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sr + j));
          const float m_new = std::max(m[r], _mm512_reduce_max_ps(vmax) * c);
          const __m512 vm = _mm512_set1_ps(m_new);
          __m512 vsum = _mm512_setzero_ps();
          uint16_t* pr = p + r * kKeys;
          for (int64_t j = 0; j < keys; j += 16) {
            const __m512 e = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vc, vm));
            vsum = _mm512_add_ps(vsum, e);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
          }
          const float alpha = std::exp2(m[r] - m_new);
          l[r] = l[r] * alpha + _mm512_reduce_add_ps(vsum);
          m[r] = m_new;
          if (kb > 0) {
            for (int64_t d = 0; d < D; ++d) o[r * D + d] *= alpha;
          }
        }

        // 3. o += p v: two groups of 16 columns at a time (tmm0, tmm7), the
        // last dt columns (tmm1) with the last pair
        const uint16_t* vb = vt + kb * kKeys * D;
        for (int64_t g0 = 0; g0 < dgroups || (g0 == 0 && dt > 0); g0 += 2) {
          const int64_t groups = std::min<int64_t>(2, dgroups - g0);
          const bool tail = dt > 0 && g0 + groups == dgroups;
          if (groups > 0) _tile_loadd(0, o + g0 * 16, D * 4);
          if (groups > 1) _tile_loadd(7, o + (g0 + 1) * 16, D * 4);
          if (tail) _tile_loadd(1, o + dgroups * 16, D * 4);
          for (int64_t step = 0; step < keys / 32; ++step) {
            _tile_loadd(2, p + step * 32, kKeys * 2);
            const uint16_t* vs = vb + step * 32 * D;
            if (groups > 0) {
              _tile_loadd(4, vs + g0 * 32, D * 4);
              _tile_dpbf16ps(0, 2, 4);
            }
            if (groups > 1) {
              _tile_loadd(4, vs + (g0 + 1) * 32, D * 4);
              _tile_dpbf16ps(7, 2, 4);
            }
            if (tail) {
              _tile_loadd(6, vs + dgroups * 32, D * 4);
              _tile_dpbf16ps(1, 2, 6);
            }
          }
          if (groups > 0) _tile_stored(0, o + g0 * 16, D * 4);
          if (groups > 1) _tile_stored(7, o + (g0 + 1) * 16, D * 4);
          if (tail) _tile_stored(1, o + dgroups * 16, D * 4);
        }
      }

      // o / l, in bfloat16, at (b, row, h)
      bf16* os = od + (b * M + row0) * o_row + h * D;
      for (int64_t r = 0; r < kRows; ++r) {
        const float inv = 1.f / l[r];
        for (int64_t d = 0; d < D; ++d) os[r * o_row + d] = static_cast<bf16>(o[r * D + d] * inv);
      }
    }
    _tile_release();
  });
  return out.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY(sdlearn, m) {
  m.def("amx_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sdlearn, CPU, m) {
  m.impl("amx_attention", amx_attention);
}
