//! Bucket lists, bucket choice, crop boxes and image preparation (spec training.md §3).

use std::path::Path;

use sd_data::bucket::{
    BucketSelector, BucketSettings, CropLtrb, Resolution, make_bucket_resolutions,
};
use sd_data::dataset_rng::DataRng;
use sd_data::image_prep::{
    AugmentOptions, LoadRequest, PrepOptions, ResizeInterpolation, decode_image, load_parallel,
    prepare_image,
};

fn r(w: u32, h: u32) -> Resolution {
    Resolution::new(w, h)
}

fn list(pairs: &[(u32, u32)]) -> Vec<Resolution> {
    pairs.iter().map(|&(w, h)| r(w, h)).collect()
}

#[test]
fn bucket_list_512_is_the_spec_example() {
    let got = make_bucket_resolutions(r(512, 512), 256, 1024, 64);
    let expected = list(&[
        (256, 832),
        (256, 896),
        (256, 960),
        (256, 1024),
        (320, 704),
        (320, 768),
        (384, 640),
        (448, 576),
        (512, 512),
        (576, 448),
        (640, 384),
        (704, 320),
        (768, 320),
        (832, 256),
        (896, 256),
        (960, 256),
        (1024, 256),
    ]);
    assert_eq!(got, expected);
}

#[test]
fn bucket_list_768_and_1024() {
    let got = make_bucket_resolutions(r(768, 768), 256, 1024, 64);
    let expected = list(&[
        (256, 1024),
        (320, 1024),
        (384, 1024),
        (448, 1024),
        (512, 1024),
        (576, 960),
        (576, 1024),
        (640, 896),
        (704, 832),
        (768, 768),
        (832, 704),
        (896, 640),
        (960, 576),
        (1024, 256),
        (1024, 320),
        (1024, 384),
        (1024, 448),
        (1024, 512),
        (1024, 576),
    ]);
    assert_eq!(got, expected);

    let got = make_bucket_resolutions(r(1024, 1024), 256, 1024, 64);
    assert_eq!(got.len(), 25);
    assert_eq!(&got[..2], &list(&[(256, 1024), (320, 1024)])[..]);
    assert_eq!(got[24], r(1024, 1024));
    assert!(got.iter().all(|b| b.width == 1024 || b.height == 1024));
}

#[test]
fn bucket_list_of_the_fixture_dataset() {
    let got = make_bucket_resolutions(r(256, 256), 128, 384, 64);
    assert_eq!(
        got,
        list(&[(128, 384), (192, 320), (256, 256), (320, 192), (384, 128)])
    );
}

fn normal_512() -> BucketSelector {
    let s = BucketSettings {
        enable_bucket: true,
        ..BucketSettings::new(r(512, 512))
    };
    BucketSelector::new(&s.normalized().expect("valid").0)
}

#[test]
fn normal_mode_assignment() {
    let sel = normal_512();
    // (image, bucket, resized)
    let cases = [
        ((512, 512), (512, 512), (512, 512)),
        ((1000, 500), (704, 320), (704, 352)),
        ((500, 1000), (320, 704), (352, 704)),
        ((256, 832), (256, 832), (256, 832)), // exact match wins
        ((3000, 2000), (640, 384), (640, 427)), // ar 1.5: 640x384 (1.667) beats 576x448 (1.286)
        ((100, 100), (512, 512), (512, 512)), // upscaled
    ];
    for (img, bucket, resized) in cases {
        let a = sel.select(r(img.0, img.1)).expect("assign");
        assert_eq!(
            (a.bucket, a.resized),
            (r(bucket.0, bucket.1), r(resized.0, resized.1)),
            "{img:?}"
        );
        let ar_error =
            f64::from(bucket.0) / f64::from(bucket.1) - f64::from(img.0) / f64::from(img.1);
        assert_eq!(a.ar_error, ar_error);
    }
}

#[test]
fn no_upscale_mode_assignment() {
    let s = BucketSettings {
        enable_bucket: true,
        bucket_no_upscale: true,
        ..BucketSettings::new(r(512, 512))
    };
    let (s, warnings) = s.normalized().expect("valid");
    assert!(warnings.iter().any(|w| w.contains("ignored")));
    let sel = BucketSelector::new(&s);
    let cases = [
        ((2000, 1000), (640, 320), (640, 320)),
        ((300, 200), (256, 192), (300, 200)),
        ((512, 512), (512, 512), (512, 512)),
        ((1024, 1024), (512, 512), (512, 512)),
    ];
    for (img, bucket, resized) in cases {
        let a = sel.select(r(img.0, img.1)).expect("assign");
        assert_eq!(
            (a.bucket, a.resized),
            (r(bucket.0, bucket.1), r(resized.0, resized.1)),
            "{img:?}"
        );
    }
    assert!(
        sel.select(r(40, 300))
            .expect_err("zero-width bucket")
            .contains("too small")
    );
}

#[test]
fn disabled_bucketing_cover_resizes_to_the_resolution() {
    let sel = BucketSelector::new(&BucketSettings::new(r(512, 512)));
    let a = sel.select(r(1000, 500)).expect("assign");
    assert_eq!((a.bucket, a.resized), (r(512, 512), r(1024, 512)));
}

#[test]
fn crop_ltrb_letterbox_convention() {
    // Wide bucket, less wide image: the box is narrower than the bucket, centred.
    let c = CropLtrb::new(r(320, 192), r(451, 300));
    assert_eq!((c.left, c.top, c.bottom), (15.0, 0.0, 192.0));
    assert!((c.right - (15.0 + 192.0 * 451.0 / 300.0)).abs() < 1e-9);
    assert_eq!(c.crop_top_left(320, false), (0, 15));
    // Tall image in a square bucket.
    let c = CropLtrb::new(r(256, 256), r(512, 600));
    assert_eq!((c.left, c.top), (18.0, 0.0));
    assert_eq!(c.crop_top_left(256, true), (0, 19)); // 256 - (18 + 218.45) = 19.55
    // Wide image in a square bucket: top is non-zero although the image was cropped sideways.
    let c = CropLtrb::new(r(256, 256), r(384, 303));
    assert_eq!(
        (c.left, c.top, c.right, c.bottom),
        (0.0, 27.0, 256.0, 229.0)
    );
    assert_eq!(c.crop_top_left(256, false), (27, 0));
    assert_eq!(c.crop_top_left(256, true), (27, 0));
}

fn save(img: image::DynamicImage, path: &Path) {
    img.save(path).expect("save test image");
}

#[test]
fn rgba_is_composited_on_white_and_gives_a_mask() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rgba.png");
    // Left half: transparent with black RGB underneath; right half: opaque red; one
    // half-transparent blue pixel.
    let img = image::RgbaImage::from_fn(600, 400, |x, y| match (x, y) {
        (599, 399) => image::Rgba([0, 0, 255, 128]),
        (x, _) if x < 300 => image::Rgba([0, 0, 0, 0]),
        _ => image::Rgba([255, 0, 0, 255]),
    });
    save(image::DynamicImage::ImageRgba8(img), &path);

    let decoded = decode_image(&path, true).expect("decode");
    assert_eq!(decoded.rgb.size, r(600, 400));
    assert_eq!(&decoded.rgb.data[..3], &[255, 255, 255]);
    let last = decoded.rgb.data.len() - 3;
    // 0·128/255 + 255·127/255 rounded: 127; blue 255·128/255 + 255·127/255 = 255.
    assert_eq!(&decoded.rgb.data[last..], &[127, 127, 255]);
    let alpha = decoded.alpha.expect("alpha kept");
    assert_eq!(
        (alpha[0], alpha[599], alpha[alpha.len() - 1]),
        (0, 255, 128)
    );

    // 600x400 (ar 1.5) -> bucket 640x384, resized 640x427, centre crop top 21.
    let a = normal_512().select(r(600, 400)).expect("assign");
    assert_eq!((a.bucket, a.resized), (r(640, 384), r(640, 427)));
    let opts = PrepOptions {
        alpha_mask: true,
        interpolation: Some(ResizeInterpolation::Nearest),
        ..Default::default()
    };
    let p = prepare_image(&path, &a, &opts, &mut DataRng::new(0, 0)).expect("prepare");
    assert_eq!(p.shape, [3, 384, 640]);
    assert_eq!(p.data.len(), 3 * 384 * 640);
    assert_eq!(p.crop_offset, (0, 21));
    assert_eq!(p.original_size, r(600, 400));
    assert!(!p.flipped);
    let plane = 384 * 640;
    // Top-left is white (1.0 in every channel), far right is red (1, -1, -1).
    assert_eq!(
        (p.data[0], p.data[plane], p.data[2 * plane]),
        (1.0, 1.0, 1.0)
    );
    let right = 100 * 640 + 639;
    assert_eq!(
        (
            p.data[right],
            p.data[plane + right],
            p.data[2 * plane + right]
        ),
        (1.0, -1.0, -1.0)
    );
    let mask = p.alpha_mask.expect("mask");
    assert_eq!((mask[0], mask[right]), (0.0, 1.0));
}

#[test]
fn sixteen_bit_and_grayscale_images_are_converted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rgb16 = dir.path().join("rgb16.png");
    save(
        image::DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
            300,
            200,
            image::Rgb([65535u16, 32896, 0]),
        )),
        &rgb16,
    );
    let gray16 = dir.path().join("gray16.png");
    save(
        image::DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(
            200,
            300,
            image::Luma([65535u16]),
        )),
        &gray16,
    );
    let gray_alpha = dir.path().join("la.png");
    save(
        image::DynamicImage::ImageLumaA8(image::ImageBuffer::from_pixel(
            64,
            64,
            image::LumaA([0u8, 0]),
        )),
        &gray_alpha,
    );

    let d = decode_image(&rgb16, false).expect("decode");
    assert_eq!(&d.rgb.data[..3], &[255, 128, 0]);
    let d = decode_image(&gray16, false).expect("decode");
    assert_eq!(
        (d.rgb.size, &d.rgb.data[..3]),
        (r(200, 300), &[255u8, 255, 255][..])
    );
    let d = decode_image(&gray_alpha, false).expect("decode");
    assert_eq!(&d.rgb.data[..3], &[255, 255, 255]); // transparent black -> white

    let sel = normal_512();
    // 300x200 (ar 1.5) -> 640x384 (upscaled with Lanczos to 640x427).
    let a = sel.select(r(300, 200)).expect("assign");
    assert_eq!((a.bucket, a.resized), (r(640, 384), r(640, 427)));
    let p = prepare_image(&rgb16, &a, &PrepOptions::default(), &mut DataRng::new(0, 0))
        .expect("prepare");
    let plane = 384 * 640;
    // A uniform image stays uniform through resizing: R = 1, G = (128/255 - 0.5)/0.5, B = -1.
    assert!(p.data[..plane].iter().all(|&v| v == 1.0));
    let g = (128.0f32 / 255.0 - 0.5) / 0.5;
    assert!(
        p.data[plane..2 * plane]
            .iter()
            .all(|&v| (v - g).abs() < 1e-6)
    );
    assert!(p.data[2 * plane..].iter().all(|&v| v == -1.0));
    // 200x300 (ar 0.667) -> 448x576? no: 384x640 (0.6) is closer than 448x576 (0.778).
    let a = sel.select(r(200, 300)).expect("assign");
    assert_eq!((a.bucket, a.resized), (r(384, 640), r(427, 640)));
}

#[test]
fn random_crop_and_flip_are_seeded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ramp.png");
    // Horizontal ramp: red = x, so flips and crop offsets are visible.
    save(
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(256, 200, |x, _| {
            image::Rgb([x as u8, 0, 0])
        })),
        &path,
    );
    let a = BucketSelector::NoUpscale {
        max_area: 256 * 256,
        steps: 64,
    }
    .select(r(256, 200))
    .expect("assign");
    assert_eq!((a.bucket, a.resized), (r(256, 192), r(256, 200)));
    let opts = PrepOptions {
        augment: AugmentOptions {
            random_crop: true,
            flip_aug: true,
            color_aug: false,
        },
        ..Default::default()
    };
    let mut tops = std::collections::BTreeSet::new();
    let mut flips = 0;
    for seed in 0..16 {
        let p1 = prepare_image(&path, &a, &opts, &mut DataRng::new(seed, 0)).expect("prepare");
        let p2 = prepare_image(&path, &a, &opts, &mut DataRng::new(seed, 0)).expect("prepare");
        assert_eq!(p1, p2, "same seed, same result");
        assert_eq!(p1.data, p2.data);
        assert_eq!(p1.crop_offset.0, 0);
        assert!(p1.crop_offset.1 <= 8);
        tops.insert(p1.crop_offset.1);
        let first_red = p1.data[0];
        if p1.flipped {
            flips += 1;
            assert_eq!(first_red, (255.0f32 / 255.0 - 0.5) / 0.5);
        } else {
            assert_eq!(first_red, -1.0);
        }
    }
    assert!(tops.len() > 1, "random crop should vary: {tops:?}");
    assert!(flips > 0 && flips < 16, "flip p = 0.5: {flips}/16");

    // Parallel loading gives the same results as sequential loading with the same seeds.
    let requests: Vec<LoadRequest> = (0..6)
        .map(|seed| LoadRequest {
            path: path.clone(),
            assignment: a,
            options: opts,
            seed,
        })
        .collect();
    let parallel = load_parallel(&requests);
    for (req, res) in requests.iter().zip(parallel) {
        let seq =
            prepare_image(&req.path, &a, &opts, &mut DataRng::new(req.seed, 0)).expect("prepare");
        assert_eq!(res.expect("prepare"), seq);
    }
}
