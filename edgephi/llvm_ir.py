"""Small llvmlite building blocks shared by the IR kernels: vector constants, loads of float16 or
float32 lanes, horizontal sums, counted loops, prefetches and intrinsic calls."""

from __future__ import annotations

from llvmlite import ir

F32 = ir.FloatType()
I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
FAST = ("fast",)
LANES = 8  # float vector width of the attention row kernels: one AVX / two NEON registers


def vec(t, n):
    return ir.VectorType(t, n)


def splat(t, n, value):
    return ir.Constant(vec(t, n), [value] * n)


def lanes(values):
    """A constant <n x i32> of lane indices, for shuffles."""
    return ir.Constant(vec(I32, len(values)), list(values))


def const(value):
    return ir.Constant(I64, value)


def halves(builder, v):
    """<32 x T> -> its lanes 0..15 and 16..31."""
    return builder.shuffle_vector(v, v, lanes(range(16))), builder.shuffle_vector(v, v, lanes(range(16, 32)))


def f16_at(builder, base, byte_offset):
    """The float16 at base + byte_offset, widened to float32."""
    bits = builder.load(builder.bitcast(builder.gep(base, [byte_offset]), I16.as_pointer()), align=2)
    return builder.fpext(builder.bitcast(bits, ir.HalfType()), F32)


def lanes_at(builder, base, byte_offset, half, count=LANES):
    """`count` float32 values at base + byte_offset, stored as float32 or as float16 bits."""
    p = builder.gep(base, [byte_offset])
    if half:
        bits = builder.load(builder.bitcast(p, vec(I16, count).as_pointer()), align=2)
        return builder.fpext(builder.bitcast(bits, vec(ir.HalfType(), count)), vec(F32, count))
    return builder.load(builder.bitcast(p, vec(F32, count).as_pointer()), align=4)


def load_vector(builder, base, byte_offset, element, count, align):
    return builder.load(builder.bitcast(builder.gep(base, [byte_offset]), vec(element, count).as_pointer()),
                        align=align)


def broadcast(builder, value, n):
    undef = ir.Constant(vec(value.type, n), ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, undef, lanes([0] * n))


def reduce_sum(builder, v):
    """Sum of a float vector's lanes, by halving."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = builder.fadd(builder.shuffle_vector(v, v, lanes(range(n))),
                         builder.shuffle_vector(v, v, lanes(range(n, 2 * n))), flags=FAST)
    return builder.extract_element(v, ir.Constant(I32, 0))


def counted_loop(builder, count, initial, body, name, start=None):
    """Emit `for i in range(start or 0, count)` carrying the values `initial`: body(i, values) emits
    the loop body (it may add blocks) and returns the next values. Returns the values after the loop."""
    entry = builder.block
    head = builder.append_basic_block(f"{name}.head")
    loop = builder.append_basic_block(f"{name}.body")
    done = builder.append_basic_block(f"{name}.done")
    builder.branch(head)
    builder.position_at_end(head)
    i = builder.phi(I64)
    i.add_incoming(const(0) if start is None else start, entry)
    values = []
    for value in initial:
        phi = builder.phi(value.type)
        phi.add_incoming(value, entry)
        values.append(phi)
    builder.cbranch(builder.icmp_signed("<", i, count), loop, done)
    builder.position_at_end(loop)
    following = body(i, values)
    last = builder.block
    i.add_incoming(builder.add(i, const(1)), last)
    for phi, value in zip(values, following):
        phi.add_incoming(value, last)
    builder.branch(head)
    builder.position_at_end(done)
    return values


def call_intrinsic(builder, name, result, args):
    fnty = ir.FunctionType(result, [a.type for a in args])
    fn = builder.module.globals.get(name) or ir.Function(builder.module, fnty, name)
    return builder.call(fn, args)


def prefetch(builder, base, offset, ahead):
    """Ask for the cache line at base + offset + ahead (bytes) before its use (read, keep in all levels)."""
    ptr = builder.gep(base, [builder.add(offset, const(ahead))])
    call_intrinsic(builder, "llvm.prefetch.p0", ir.VoidType(),
                   [ptr, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def array_rows(builder, array, t0, count, elem):
    """Pointers to rows t0 .. t0 + count - 1 of a 2-D numba array struct, typed elem*."""
    stride = builder.extract_value(array.strides, 0)
    base = builder.bitcast(array.data, I8.as_pointer())
    return [builder.bitcast(builder.gep(base, [builder.mul(builder.add(t0, const(i)), stride)]), elem.as_pointer())
            for i in range(count)]
