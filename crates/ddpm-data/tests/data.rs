//! Data pipeline tests on the shipped MNIST and on small files written here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;

use candle_core::Device;
use ddpm_data::{
    load_dataset, load_image_folder, read_idx_images, read_idx_labels, Batcher, DataError, Dataset,
    DatasetKind, Loader, LoaderConfig, Split, TensorBatcher,
};
use sha2::{Digest, Sha256};

fn assets() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/mnist")
}

fn idx_images(n: u32, rows: u32, cols: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for w in [0x803u32, n, rows, cols] {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x801u32.to_be_bytes());
    v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn write_split(dir: &Path, split: Split, images: &[u8], labels: &[u8], gzip: bool) {
    let (i, l) = split.file_stems();
    let (i, l, images, labels) = if gzip {
        (format!("{i}.gz"), format!("{l}.gz"), gz(images), gz(labels))
    } else {
        (
            i.to_string(),
            l.to_string(),
            images.to_vec(),
            labels.to_vec(),
        )
    };
    std::fs::write(dir.join(i), images).unwrap();
    std::fs::write(dir.join(l), labels).unwrap();
}

fn digits() -> Vec<String> {
    (0..10).map(|d| d.to_string()).collect()
}

#[test]
fn shipped_mnist_matches_sha256sums() {
    let sums = std::fs::read_to_string(assets().join("SHA256SUMS")).unwrap();
    let mut checked = 0;
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (hash, name) = line.split_once("  ").unwrap();
        let bytes = std::fs::read(assets().join(name.trim())).unwrap();
        let got: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, hash, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[test]
fn shipped_mnist_loads_with_the_right_shape_range_and_labels() {
    let train = load_dataset(&DatasetKind::Mnist, Some(&assets()), Split::Train, (28, 28)).unwrap();
    let test = load_dataset(&DatasetKind::Mnist, Some(&assets()), Split::Test, (28, 28)).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!(train.image_shape(), (1, 28, 28));
    // Well-known first labels of the two splits.
    assert_eq!(train.get(0).unwrap().1, 5);
    assert_eq!(test.get(0).unwrap().1, 7);
    let mut hist = [0usize; 10];
    for &l in train.labels() {
        hist[l as usize] += 1;
    }
    assert_eq!(hist[1], 6742); // the most frequent digit in the training split
    let (x, y) = test.take(64).to_tensors(&Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[64, 1, 28, 28]);
    assert_eq!(y.dims(), &[64]);
    assert_eq!(y.dtype(), candle_core::DType::U32);
    assert_eq!(x.min_all().unwrap().to_scalar::<f32>().unwrap(), -1.0);
    assert_eq!(x.max_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
}

#[test]
fn raw_and_gzipped_idx_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..2 * 3 * 4).map(|i| (i * 10) as u8).collect();
    let (raw, gzd) = (dir.path().join("raw"), dir.path().join("gz"));
    std::fs::create_dir_all(&raw).unwrap();
    std::fs::create_dir_all(&gzd).unwrap();
    write_split(
        &raw,
        Split::Test,
        &idx_images(2, 3, 4, &data),
        &idx_labels(&[3, 9]),
        false,
    );
    write_split(
        &gzd,
        Split::Test,
        &idx_images(2, 3, 4, &data),
        &idx_labels(&[3, 9]),
        true,
    );
    for d in [&raw, &gzd] {
        let ds = ddpm_data::load_idx_dir(d, Split::Test, digits()).unwrap();
        assert_eq!(ds.image_shape(), (1, 3, 4));
        assert_eq!(ds.get(1).unwrap(), (&data[12..], 9));
    }
}

fn err_string(e: DataError) -> String {
    e.to_string()
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_dataset(
        &DatasetKind::Mnist,
        Some(dir.path()),
        Split::Train,
        (28, 28),
    )
    .unwrap_err();
    assert!(matches!(e, DataError::Missing { .. }), "{e:?}");
    let msg = err_string(e);
    assert!(
        msg.contains("train-images-idx3-ubyte") && msg.contains("--data-dir"),
        "{msg}"
    );
}

#[test]
fn wrong_magic_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    // A label file where an image file is expected.
    std::fs::write(&p, idx_labels(&[1, 2])).unwrap();
    let e = read_idx_images(&p).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::BadMagic {
                what: "image",
                found: 0x801,
                ..
            }
        ),
        "{e:?}"
    );
    std::fs::write(&p, idx_images(1, 1, 1, &[0])).unwrap();
    let e = read_idx_labels(&p, 10).unwrap_err();
    assert!(err_string(e).contains("not an IDX label file"));
}

#[test]
fn truncated_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    // Header promises 3 images of 2×2, only 5 bytes follow.
    std::fs::write(&p, idx_images(3, 2, 2, &[1, 2, 3, 4, 5])).unwrap();
    let e = read_idx_images(&p).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::Truncated {
                expected: 12,
                found: 5,
                ..
            }
        ),
        "{e:?}"
    );
    // Header itself cut short.
    std::fs::write(&p, [0u8, 0, 8]).unwrap();
    assert!(matches!(
        read_idx_images(&p).unwrap_err(),
        DataError::Truncated { .. }
    ));
    // A gzip stream cut in half.
    let full = gz(&idx_images(3, 2, 2, &[7; 12]));
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    let e = read_idx_images(&p).unwrap_err();
    assert!(err_string(e).contains(&p.display().to_string()));
    // Zero-sized images.
    std::fs::write(&p, idx_images(1, 0, 2, &[])).unwrap();
    assert!(matches!(
        read_idx_images(&p).unwrap_err(),
        DataError::BadDimensions { .. }
    ));
}

#[test]
fn count_mismatch_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_split(
        dir.path(),
        Split::Train,
        &idx_images(2, 1, 1, &[0, 1]),
        &idx_labels(&[1, 2, 3]),
        true,
    );
    let e = ddpm_data::load_idx_dir(dir.path(), Split::Train, digits()).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::CountMismatch {
                n_images: 2,
                n_labels: 3,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn label_out_of_range_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l");
    std::fs::write(&p, idx_labels(&[0, 9, 10])).unwrap();
    let e = read_idx_labels(&p, 10).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::LabelOutOfRange {
                index: 2,
                label: 10,
                ..
            }
        ),
        "{e:?}"
    );
}

fn write_png(path: &Path, w: u32, h: u32, value: u8) {
    image::RgbImage::from_pixel(w, h, image::Rgb([value, value, value]))
        .save(path)
        .unwrap();
}

#[test]
fn image_folder_sorted_grayscale_resized() {
    let dir = tempfile::tempdir().unwrap();
    for (class, v) in [("zeta", 200u8), ("alpha", 50)] {
        std::fs::create_dir_all(dir.path().join(class)).unwrap();
        write_png(&dir.path().join(class).join("a.png"), 40, 40, v);
        write_png(&dir.path().join(class).join("b.PNG"), 28, 28, v);
    }
    std::fs::write(dir.path().join("alpha/notes.txt"), "ignored").unwrap();
    let ds = load_image_folder(dir.path(), 32, 32).unwrap();
    assert_eq!(ds.class_names(), &["alpha".to_string(), "zeta".to_string()]);
    assert_eq!(ds.len(), 4);
    assert_eq!(ds.image_shape(), (1, 32, 32));
    let (px, label) = ds.get(3).unwrap();
    assert_eq!(label, 1);
    assert!(px.iter().all(|&p| p == 200));
    // Held-out split of folders: every tenth image per class.
    let train = load_dataset(
        &DatasetKind::Folder(dir.path().into(), ddpm_data::Channels::Auto),
        None,
        Split::Train,
        (8, 8),
    )
    .unwrap();
    assert_eq!(train.len(), 4);
    assert_eq!(train.image_shape(), (1, 8, 8));
}

/// Colour is kept when the images have it, laid out as planes (CHW); the channels can be
/// forced either way; the dataset's spelling names the choice.
#[test]
fn image_folders_keep_colour_or_take_the_channels_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("red")).unwrap();
    std::fs::create_dir_all(dir.path().join("gray")).unwrap();
    image::RgbImage::from_pixel(4, 4, image::Rgb([200, 10, 30]))
        .save(dir.path().join("red/a.png"))
        .unwrap();
    image::GrayImage::from_pixel(4, 4, image::Luma([90]))
        .save(dir.path().join("gray/a.png"))
        .unwrap();
    let ds = load_image_folder(dir.path(), 4, 4).unwrap();
    assert_eq!(ds.image_shape(), (3, 4, 4));
    let (red, _) = ds.get(1).unwrap();
    assert!(red[..16].iter().all(|&p| p == 200), "the R plane first");
    assert!(red[16..32].iter().all(|&p| p == 10));
    assert!(red[32..].iter().all(|&p| p == 30));
    let (gray, _) = ds.get(0).unwrap();
    assert!(
        gray.iter().all(|&p| p == 90),
        "a gray image repeats its channel"
    );
    let forced =
        ddpm_data::load_image_folder_as(dir.path(), 4, 4, ddpm_data::Channels::Gray).unwrap();
    assert_eq!(forced.image_shape(), (1, 4, 4));
    // BT.709 luma of (200, 10, 30): 0.2126·200 + 0.7152·10 + 0.0722·30 ≈ 52.
    let (l, _) = forced.get(1).unwrap();
    assert!((l[0] as i32 - 52).abs() <= 1, "{}", l[0]);
    // A folder of gray pixels (whatever the file format) stays one channel unless forced.
    std::fs::remove_dir_all(dir.path().join("red")).unwrap();
    write_png(&dir.path().join("gray/b.png"), 4, 4, 7);
    assert_eq!(
        load_image_folder(dir.path(), 4, 4).unwrap().image_shape(),
        (1, 4, 4)
    );
    let rgb = ddpm_data::load_image_folder_as(dir.path(), 4, 4, ddpm_data::Channels::Rgb).unwrap();
    assert_eq!(rgb.image_shape(), (3, 4, 4));
    for (s, want) in [
        ("folder:/d", ddpm_data::Channels::Auto),
        ("folder-gray:/d", ddpm_data::Channels::Gray),
        ("folder-rgb:/d", ddpm_data::Channels::Rgb),
    ] {
        let kind: DatasetKind = s.parse().unwrap();
        assert_eq!(kind, DatasetKind::Folder("/d".into(), want));
        assert_eq!(kind.to_string(), s);
    }
    assert!("folder-rgb:".parse::<DatasetKind>().is_err());
}

#[test]
fn image_folder_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        load_image_folder(dir.path(), 28, 28).unwrap_err(),
        DataError::NoClasses { .. }
    ));
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    write_png(&dir.path().join("a/x.png"), 4, 4, 1);
    let e = load_image_folder(dir.path(), 28, 28).unwrap_err();
    assert!(
        matches!(&e, DataError::EmptyClassFolder { path } if path.ends_with("b")),
        "{e:?}"
    );
    std::fs::write(dir.path().join("b/broken.png"), b"not a png").unwrap();
    let e = load_image_folder(dir.path(), 28, 28).unwrap_err();
    assert!(
        matches!(&e, DataError::UnreadableImage { path, .. } if path.ends_with("broken.png")),
        "{e:?}"
    );
    let e = load_image_folder(&dir.path().join("nope"), 28, 28).unwrap_err();
    assert!(matches!(e, DataError::Missing { .. }), "{e:?}");
}

#[test]
fn loader_shuffles_by_seed_and_epoch_and_drops_last() {
    let cfg = LoaderConfig {
        batch_size: 4,
        shuffle: true,
        drop_last: true,
        seed: 42,
    };
    let loader = Loader::new(10, cfg).unwrap();
    assert_eq!(loader.batches_per_epoch(), 2);
    let e0: Vec<Vec<usize>> = loader.epoch(0).collect();
    assert_eq!(e0, loader.epoch(0).collect::<Vec<_>>());
    assert_ne!(e0, loader.epoch(1).collect::<Vec<_>>());
    assert!(e0.iter().all(|b| b.len() == 4));
    let mut seen: Vec<usize> = e0.concat();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 8);
    let other = Loader::new(10, LoaderConfig { seed: 43, ..cfg }).unwrap();
    assert_ne!(e0, other.epoch(0).collect::<Vec<_>>());
    // Without drop_last and shuffle: every index once, in order, last batch short.
    let plain = Loader::new(
        10,
        LoaderConfig {
            shuffle: false,
            drop_last: false,
            ..cfg
        },
    )
    .unwrap();
    let all: Vec<Vec<usize>> = plain.epoch(5).collect();
    assert_eq!(all.len(), 3);
    assert_eq!(all.concat(), (0..10).collect::<Vec<_>>());
    assert!(Loader::new(
        10,
        LoaderConfig {
            batch_size: 0,
            ..cfg
        }
    )
    .is_err());
}

#[test]
fn batcher_gathers_the_requested_examples() {
    let pixels: Vec<u8> = vec![0, 0, 255, 255, 51, 51];
    let ds = ddpm_data::ImageDataset::new(pixels, vec![0, 1, 2], (1, 1, 2), digits()).unwrap();
    let b = TensorBatcher::new(&ds, &Device::Cpu).unwrap();
    let batch = b.batch(&[2, 0]).unwrap();
    assert_eq!(batch.labels.to_vec1::<u32>().unwrap(), vec![2, 0]);
    let v: Vec<f32> = batch.images.flatten_all().unwrap().to_vec1().unwrap();
    assert!((v[0] - (51.0 * 2.0 / 255.0 - 1.0)).abs() < 1e-6 && v[2] == -1.0);
    assert!(matches!(
        b.batch(&[3]).unwrap_err(),
        DataError::IndexOutOfRange { index: 3, .. }
    ));
}

#[cfg(not(feature = "hub"))]
#[test]
fn no_local_copy_without_hub_says_where_to_point_data_dir() {
    // Fashion-MNIST is not shipped, and this test binary does not set DDPM_DATA_DIR.
    if std::env::var_os(ddpm_data::DATA_DIR_ENV).is_some() {
        eprintln!("skipped: DDPM_DATA_DIR is set in the environment");
        return;
    }
    let e = load_dataset(&DatasetKind::FashionMnist, None, Split::Train, (28, 28)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("--data-dir") && msg.contains("DDPM_DATA_DIR"),
        "{msg}"
    );
}

#[test]
fn dataset_kind_parses() {
    assert_eq!("mnist".parse::<DatasetKind>().unwrap(), DatasetKind::Mnist);
    assert_eq!(
        "fashion-mnist".parse::<DatasetKind>().unwrap(),
        DatasetKind::FashionMnist
    );
    assert_eq!(
        "folder:/x/y".parse::<DatasetKind>().unwrap(),
        DatasetKind::Folder("/x/y".into(), ddpm_data::Channels::Auto)
    );
    assert!("cifar".parse::<DatasetKind>().is_err());
    assert!("folder:".parse::<DatasetKind>().is_err());
}

/// A gzip file of several members (as `cat a.gz b.gz` or pigz makes) reads as gzip readers
/// read it: all members, one after the other.
#[test]
fn multi_member_gzip_reads_every_member() {
    let dir = tempfile::tempdir().unwrap();
    let labels: Vec<u8> = (0..200u32).map(|i| (i % 10) as u8).collect();
    let raw = idx_labels(&labels);
    let (a, b) = raw.split_at(57);
    let mut two = gz(a);
    two.extend(gz(b));
    let path = dir.path().join("labels-idx1-ubyte.gz");
    std::fs::write(&path, &two).unwrap();
    let read = read_idx_labels(&path, 10).unwrap();
    assert_eq!(read, labels.iter().map(|&l| l as u32).collect::<Vec<_>>());
}

/// A limit bounds what is read: the first examples of a file whose header promises far more
/// than it holds load, while reading it whole is an error.
#[test]
fn a_limit_reads_only_the_first_examples() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..50 * 4 * 4).map(|i| i as u8).collect();
    let path = dir.path().join("images-idx3-ubyte.gz");
    std::fs::write(&path, gz(&idx_images(1_000_000, 4, 4, &pixels))).unwrap();
    let e = err_string(read_idx_images(&path).unwrap_err());
    assert!(e.contains("truncated"), "{e}");
    let first = ddpm_data::read_idx_images_limited(&path, Some(10)).unwrap();
    assert_eq!(first.n, 10);
    assert_eq!(first.pixels, pixels[..10 * 16]);
    // Through the dataset loader, as `ddpm train --limit` calls it.
    let labels: Vec<u8> = (0..50).map(|i| (i % 10) as u8).collect();
    write_split(
        dir.path(),
        Split::Train,
        &idx_images(50, 4, 4, &pixels),
        &idx_labels(&labels),
        true,
    );
    let ds = ddpm_data::load_dataset_limited(
        &DatasetKind::Mnist,
        Some(dir.path()),
        Split::Train,
        (4, 4),
        Some(7),
    )
    .unwrap();
    assert_eq!(ds.len(), 7);
}

/// A FIFO or a device where a data file should be is refused before it is opened (it would
/// block, or read without end).
#[cfg(unix)]
#[test]
fn special_files_are_refused_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("train-images-idx3-ubyte");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let e = err_string(read_idx_images(&fifo).unwrap_err());
    assert!(e.contains("FIFO") && e.contains("train-images"), "{e}");
    let e = err_string(read_idx_labels(Path::new("/dev/zero"), 10).unwrap_err());
    assert!(e.contains("device"), "{e}");
}
