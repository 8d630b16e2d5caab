// The kernel's body, included once per instruction set by int_linear.cpp inside a namespace that
// defines V (a vector of W fp32 lanes), vzero, vload, vadd, vfma, vscale, vsum, widen8, widen4,
// widen_f16 and widen_bf16. Not a header to include anywhere else.

// W weights of row `row` from input k, as fp32 minus the zero z: one weight per byte (int8) or
// per two bytes (fp16, bf16: no zero).
template <Codes C>
inline V widen(const uint8_t* row, int64_t k, int z) {
  if constexpr (C == Codes::f16) return widen_f16(reinterpret_cast<const uint16_t*>(row) + k);
  else if constexpr (C == Codes::bf16) return widen_bf16(reinterpret_cast<const uint16_t*>(row) + k);
  else return widen8(row + k, C == Codes::s8, z);
}

// R weight rows (n0 ..) against T activation rows (m0 ..). Each pair gets A accumulators per
// group (int8 and 16-bit: alternate vectors; int4: the low and the high halves), so R * T * A
// chains of FMAs run side by side whatever the group width; each x vector is loaded once for
// the R rows. At the end of a group its scale multiplies the accumulated sum into the pair's total.
template <int T, int R, Codes C>
inline void tile(const Problem& p, int64_t n0, int64_t m0) {
  constexpr int A = 2;
  const int64_t gs = p.K / p.G;
  const int64_t bytes = C == Codes::u4 ? p.K / 2 : C == Codes::f16 || C == Codes::bf16 ? 2 * p.K : p.K;  // a row
  const int64_t half = p.K / 2;                      // int4: where a row's odd inputs start in x
  const float* x[T];
  for (int t = 0; t < T; ++t) x[t] = p.x + (m0 + t) * p.K;
  const uint8_t* row[R];
  int64_t srow[R];
  for (int r = 0; r < R; ++r) {
    row[r] = p.codes + (n0 + r) * bytes;
    srow[r] = p.scale_rows == 1 ? 0 : n0 + r;
  }
  V total[R][T];
  float tail[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      total[r][t] = vzero();
      tail[r][t] = 0.0f;
    }
  for (int64_t g = 0; g < p.G; ++g) {
    int z[R];
    for (int r = 0; r < R; ++r) z[r] = group_zero(p, srow[r], g);
    V acc[R][T][A];
    float rest[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) {
        for (int a = 0; a < A; ++a) acc[r][t][a] = vzero();
        rest[r][t] = 0.0f;
      }
    if constexpr (C != Codes::u4) {
      int64_t k = g * gs;
      const int64_t end = k + gs;
      for (; T <= 4 && k + 2 * W <= end; k += 2 * W) {  // (more rows are chains enough with one vector)
        for (int a = 0; a < A; ++a) {
          V xv[T];
          for (int t = 0; t < T; ++t) xv[t] = vload(x[t] + k + a * W);
          for (int r = 0; r < R; ++r) {
            const V w = widen<C>(row[r], k + a * W, z[r]);
            for (int t = 0; t < T; ++t) acc[r][t][a] = vfma(w, xv[t], acc[r][t][a]);
          }
        }
      }
      for (; k + W <= end; k += W) {  // the R weight vectors held, each x vector loaded once for them
        V w[R];
        for (int r = 0; r < R; ++r) w[r] = widen<C>(row[r], k, z[r]);
        for (int t = 0; t < T; ++t) {
          const V xv = vload(x[t] + k);
          for (int r = 0; r < R; ++r) acc[r][t][0] = vfma(w[r], xv, acc[r][t][0]);
        }
      }
      for (; k < end; ++k) {
        for (int r = 0; r < R; ++r) {
          const float w = weight_at<C>(row[r], k, z[r]);
          for (int t = 0; t < T; ++t) rest[r][t] += w * x[t][k];
        }
      }
    } else {
      // Byte j of a row holds inputs 2j (low half) and 2j + 1 (high half); x was split into its
      // even inputs (the first K / 2 of each row) and its odd inputs (the next K / 2).
      int64_t j = g * (gs / 2);
      const int64_t end = j + gs / 2;
      for (; j + W <= end; j += W) {
        V xe[T], xo[T];
        for (int t = 0; t < T; ++t) {
          xe[t] = vload(x[t] + j);
          xo[t] = vload(x[t] + half + j);
        }
        for (int r = 0; r < R; ++r) {
          V lo, hi;
          widen4(row[r] + j, z[r], lo, hi);
          for (int t = 0; t < T; ++t) {
            acc[r][t][0] = vfma(lo, xe[t], acc[r][t][0]);
            acc[r][t][1] = vfma(hi, xo[t], acc[r][t][1]);
          }
        }
      }
      for (; j < end; ++j) {
        for (int r = 0; r < R; ++r) {
          const float lo = static_cast<float>((row[r][j] & 0x0F) - z[r]);
          const float hi = static_cast<float>((row[r][j] >> 4) - z[r]);
          for (int t = 0; t < T; ++t) rest[r][t] += lo * x[t][j] + hi * x[t][half + j];
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = p.scale[srow[r] * p.G + g];
      for (int t = 0; t < T; ++t) {
        total[r][t] = vscale(vadd(acc[r][t][0], acc[r][t][1]), s, total[r][t]);
        tail[r][t] += rest[r][t] * s;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) p.y[(m0 + t) * p.N + n0 + r] = vsum(total[r][t]) + tail[r][t];
}

// Every activation row against R weight rows from n0: 5 to 8 rows (not int4) in one tile, else
// tiles of 4 activation rows (one weight row at a time), then what is left (1: four weight rows
// at a time; 2: two; 3: one).
template <int R, Codes C>
inline void rows(const Problem& p, int64_t n0) {
  if constexpr (C != Codes::u4) {  // 5 to 8 rows (a speculative step's checks) in one pass over the weights
    switch (p.M) {
      case 5: for (int r = 0; r < R; ++r) tile<5, 1, C>(p, n0 + r, 0); return;
      case 6: for (int r = 0; r < R; ++r) tile<6, 1, C>(p, n0 + r, 0); return;
      case 7: for (int r = 0; r < R; ++r) tile<7, 1, C>(p, n0 + r, 0); return;
      case 8: for (int r = 0; r < R; ++r) tile<8, 1, C>(p, n0 + r, 0); return;
      default: break;
    }
  }
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4)
    for (int r = 0; r < R; ++r) tile<4, 1, C>(p, n0 + r, m);
  switch (p.M - m) {
    case 3:
      for (int r = 0; r < R; ++r) tile<3, 1, C>(p, n0 + r, m);
      break;
    case 2:
      for (int r = 0; r < R; r += 2) {
        if (r + 2 <= R) tile<2, 2, C>(p, n0 + r, m);
        else tile<2, 1, C>(p, n0 + r, m);
      }
      break;
    case 1:
      tile<1, R, C>(p, n0, m);
      break;
    default:
      break;
  }
}

template <Codes C>
inline void run_rows(const Problem& p) {
  // Blocks of 4 weight rows are split among the threads; the last N % 4 rows go one by one.
  constexpr int B = 4;
  const int64_t blocks = p.N / B;
  const int64_t grain = std::max<int64_t>(4, blocks / (8 * at::get_num_threads()));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) rows<B, C>(p, b * B);
  });
  for (int64_t n = blocks * B; n < p.N; ++n) rows<1, C>(p, n);
}

inline void run(const Problem& p) {
  switch (p.codes_kind) {
    case Codes::u4: return run_rows<Codes::u4>(p);
    case Codes::s8: return run_rows<Codes::s8>(p);
    case Codes::u8: return run_rows<Codes::u8>(p);
    case Codes::f16: return run_rows<Codes::f16>(p);
    case Codes::bf16: return run_rows<Codes::bf16>(p);
  }
}
