#!/usr/bin/env python3
"""Reapplies the ddpm-rs change to candle-core's src/backprop.rs (vendor/README.md).

usage: python3 vendor/patch-backprop.py PATH/TO/candle-core/src/backprop.rs

Rewrites every `let g = grads.or_insert(arg)?;` ... `*g = g.add(&expr)?` (or `.sub`) into
`grads.accumulate(arg, &expr)?` (or `&(expr).neg()?`), leaves the places that use the
accumulated tensor itself alone, and adds `GradStore::accumulate`. Prints what it changed.
"""
import re
import sys

ACCUMULATE = '''    /// Adds `grad` to the gradient of `tensor`. The first gradient of a tensor is stored as it is
    /// (made contiguous; copied if it is a view at an offset into a larger buffer) instead of
    /// being added to a tensor of zeroes: the same values (up to the sign of zero) without a
    /// zero-fill and a full-size addition per gradient (ddpm-rs patch, vendor/README.md).
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let sum = entry.get().add(grad)?;
                *entry.get_mut() = sum;
            }
            Entry::Vacant(entry) => {
                let matches = grad.shape() == tensor.shape()
                    && grad.dtype() == tensor.dtype()
                    && grad.device().same_device(tensor.device());
                let first = if !matches {
                    // What upstream does, so that a mismatch fails (or broadcasts) as it did.
                    tensor.zeros_like()?.add(grad)?
                } else if grad.layout().start_offset() == 0 {
                    grad.contiguous()?
                } else {
                    // A view into a larger buffer (e.g. one part of an op's packed gradients):
                    // stored as is, it would keep the whole buffer alive until the step ends.
                    grad.force_contiguous()?
                };
                entry.insert(first);
            }
        }
        Ok(())
    }

    /// Extend this gradient store with the contents of another.'''


def main(path):
    lines = open(path).read().split('\n')
    out, i, changed, kept = [], 0, 0, []
    let_re = re.compile(r'^(\s*)let (\w+) = grads\.or_insert\(([\w.]+)\)\?;$')
    while i < len(lines):
        m = let_re.match(lines[i])
        if m:
            _, v, arg = m.groups()
            j, found = i + 1, None
            while j < len(lines) and j < i + 12:
                u = re.match(r'^(\s*)\*' + v + r' = ' + v + r'\.(add|sub)\(&(.*)\)\?(;?)$', lines[j])
                if u:
                    found = (j, u)
                    break
                if re.search(r'\b' + v + r'\b', lines[j]):
                    break
                j += 1
            if found:
                j, u = found
                between, expr = lines[i + 1:j], u.group(3)
                uses_sum = re.search(r'\b' + v + r'\b', expr)
                shadows = any(re.search(r'\blet ' + re.escape(arg) + r'\b', l) for l in between)
                if not (uses_sum or shadows):
                    out.extend(between)
                    if u.group(2) == 'add':
                        out.append(f"{u.group(1)}grads.accumulate({arg}, &{expr})?;")
                    else:
                        out.append(f"{u.group(1)}grads.accumulate({arg}, &({expr}).neg()?)?;")
                    changed += 1
                    i = j + 1
                    continue
            kept.append(i + 1)
        out.append(lines[i])
        i += 1
    s = '\n'.join(out)
    marker = '    /// Extend this gradient store with the contents of another.'
    if marker not in s or 'fn accumulate(' in s:
        sys.exit('backprop.rs: GradStore::extend not found, or already patched')
    s = s.replace(marker, ACCUMULATE, 1)
    open(path, 'w').write(s)
    print(f"{path}: {changed} accumulations rewritten; or_insert kept at lines {kept}")


if __name__ == '__main__':
    main(sys.argv[1])
