//! The backward pass of the patched candle-core (vendor/README.md): first gradients are stored,
//! not added to zeroes, and the gradients are the same as upstream's.
#![allow(clippy::unwrap_used)]

use candle_core::{Device, Storage, Tensor, Var};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The address and length (in f32 values) of a CPU tensor's whole buffer.
fn buffer(t: &Tensor) -> (*const f32, usize) {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(candle_core::CpuStorage::F32(v)) => (v.as_ptr(), v.len()),
        _ => panic!("expected an f32 CPU tensor"),
    }
}

#[test]
fn first_gradients_are_stored_not_added_to_zeroes() {
    let dev = Device::Cpu;
    let a = Var::new(&[1f32, 2., 3.], &dev).unwrap();
    let b = Var::new(&[4f32, 5., 6.], &dev).unwrap();
    let y = (a.as_tensor() + b.as_tensor()).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap();
    let (ga, gb) = (g.get(&a).unwrap(), g.get(&b).unwrap());
    assert_eq!(values(ga), [1., 1., 1.]);
    assert_eq!(values(gb), [1., 1., 1.]);
    // Upstream adds each into its own tensor of zeroes (two buffers); the patch stores the one
    // gradient of the sum for both.
    assert_eq!(
        buffer(ga).0,
        buffer(gb).0,
        "the candle-core in use is not the patched one of vendor/ (see vendor/README.md)"
    );
}

#[test]
fn fan_out_subtraction_transpose_and_broadcast_match_hand_computed_gradients() {
    let dev = Device::Cpu;
    // y = Σ (x·x + x): dy/dx = 2x + 1 (x feeds three consumers, so its gradient accumulates).
    let x = Var::new(&[1f32, -2., 0.5], &dev).unwrap();
    let t = x.as_tensor();
    let y = ((t * t).unwrap() + t).unwrap().sum_all().unwrap();
    assert_eq!(
        values(y.backward().unwrap().get(&x).unwrap()),
        [3., -3., 2.]
    );

    // y = Σ 3·(a − b): dy/da = 3, dy/db = −3.
    let a = Var::new(&[1f32, 2.], &dev).unwrap();
    let b = Var::new(&[5f32, 7.], &dev).unwrap();
    let y = ((a.as_tensor() - b.as_tensor()).unwrap() * 3.0)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = y.backward().unwrap();
    assert_eq!(values(g.get(&a).unwrap()), [3., 3.]);
    assert_eq!(values(g.get(&b).unwrap()), [-3., -3.]);

    // y = Σ xᵀ ⊙ c with x [2, 3], c [3, 2]: dy/dx = cᵀ. The first gradient arrives as a
    // transposed view; what is stored must be contiguous, as upstream's sum is.
    let x = Var::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev).unwrap();
    let c = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
    let y = (x.as_tensor().t().unwrap() * &c)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = y.backward().unwrap();
    let gx = g.get(&x).unwrap();
    assert!(gx.is_contiguous());
    assert_eq!(gx.dims(), [2, 3]);
    assert_eq!(values(gx), [1., 3., 5., 2., 4., 6.]);

    // y = Σ (m + bias) over 4 rows: dy/dbias = 4 for each column.
    let bias = Var::new(&[0f32, 1., 2.], &dev).unwrap();
    let m = Tensor::zeros((4, 3), candle_core::DType::F32, &dev).unwrap();
    let y = m
        .broadcast_add(bias.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(
        values(y.backward().unwrap().get(&bias).unwrap()),
        [4., 4., 4.]
    );
}

#[test]
fn a_first_gradient_that_is_a_view_into_a_larger_buffer_is_stored_compact() {
    // The gradient of a concatenation reaches its second part as a view at an offset into the
    // concatenation's gradient; stored as it is, it would keep that whole buffer alive.
    let dev = Device::Cpu;
    let a = Var::new(&[1f32, 2.], &dev).unwrap();
    let b = Var::new(&[3f32, 4., 5.], &dev).unwrap();
    let w = Tensor::new(&[1f32, 2., 3., 4., 5.], &dev).unwrap();
    let y = (Tensor::cat(&[a.as_tensor(), b.as_tensor()], 0).unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = y.backward().unwrap();
    let gb = g.get(&b).unwrap();
    assert_eq!(values(gb), [3., 4., 5.]);
    assert_eq!(gb.layout().start_offset(), 0);
    assert_eq!(
        buffer(gb).1,
        3,
        "the stored gradient holds its own 3 values only"
    );
    assert_eq!(values(g.get(&a).unwrap()), [1., 2.]);
}
