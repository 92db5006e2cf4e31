#!/bin/tcsh -f
# Download and unzip MS COCO 2014 and Karpathy's caption splits for create_input_files.py.
#
#     ./download_and_unzip_datasets.csh            # into ./data
#     ./download_and_unzip_datasets.csh /big/disk  # into /big/disk
#
# What it downloads (zips are kept in TARGET/zips; about 20 GB of zips plus 20 GB unzipped):
#     train2014.zip                  ~13 GB   COCO 2014 training images (82,783)
#     val2014.zip                    ~6 GB    COCO 2014 validation images (40,504)
#     annotations_trainval2014.zip   ~241 MB  COCO 2014 annotations; only the caption files are unzipped
#     caption_datasets.zip           small    Karpathy's splits: dataset_coco.json, dataset_flickr8k.json,
#                                             dataset_flickr30k.json
#
# Layout it leaves behind (TARGET defaults to data):
#     TARGET/coco/train2014/*.jpg
#     TARGET/coco/val2014/*.jpg
#     TARGET/coco/annotations/captions_train2014.json, captions_val2014.json
#     TARGET/caption_datasets/dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json
#
# Safe to re-run: a zip that already passes `unzip -t` is not downloaded again (testing the big ones
# takes a minute or two), a partial one is resumed, and `unzip -n` never overwrites extracted files.
# The Flickr8k/30k images themselves are not downloaded (they need a request form); only their splits.

if ($#argv > 1) then
    echo "usage: $0 [target folder, default data]"
    exit 1
endif
set target = data
if ($#argv == 1) set target = "$argv[1]"

# curl preferred; both resume a partial file (-C - / -c) and fail on HTTP errors instead of saving them.
if (-X curl) then
    set downloader = curl
else if (-X wget) then
    set downloader = wget
else
    echo "error: neither curl nor wget is installed; install one of them and run this again"
    exit 1
endif
if (! -X unzip) then
    echo "error: unzip is not installed; install it (e.g. apt-get install unzip) and run this again"
    exit 1
endif

set urls = ( \
    http://images.cocodataset.org/zips/train2014.zip \
    http://images.cocodataset.org/zips/val2014.zip \
    http://images.cocodataset.org/annotations/annotations_trainval2014.zip \
    http://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip \
)

mkdir -p "$target/zips" "$target/coco" "$target/caption_datasets"
if ($status != 0) then
    echo "error: cannot create folders under $target"
    exit 1
endif

foreach url ($urls)
    set zip = "$target/zips/$url:t"
    unzip -tq "$zip" >& /dev/null
    if ($status == 0) then
        echo "==> $zip is already complete, not downloading it again"
        continue
    endif
    echo "==> downloading $url to $zip"
    # $status is saved inside each branch because tcsh resets it at endif.
    if ($downloader == curl) then
        curl -fL --retry 3 -C - -o "$zip" "$url"
        set download_status = $status
    else
        wget -c -O "$zip" "$url"
        set download_status = $status
    endif
    if ($download_status != 0) then
        echo "error: downloading $url failed; run this script again to resume, or fetch it by hand into $zip"
        exit 1
    endif
    unzip -tq "$zip" >& /dev/null
    if ($status != 0) then
        echo "error: $zip is corrupt; delete it and run this script again"
        exit 1
    endif
end

echo "==> unzipping COCO images into $target/coco (train2014/, val2014/)"
foreach name (train2014 val2014)
    unzip -q -n "$target/zips/$name.zip" -d "$target/coco"
    if ($status != 0) then
        echo "error: unzipping $target/zips/$name.zip failed (disk full?)"
        exit 1
    endif
end

echo "==> unzipping the COCO caption annotations into $target/coco/annotations"
unzip -q -n "$target/zips/annotations_trainval2014.zip" \
    annotations/captions_train2014.json annotations/captions_val2014.json -d "$target/coco"
if ($status != 0) then
    echo "error: unzipping $target/zips/annotations_trainval2014.zip failed"
    exit 1
endif

# -j drops any folder inside the zip, so the JSON files land directly in caption_datasets/.
echo "==> unzipping Karpathy's splits into $target/caption_datasets"
unzip -q -n -j "$target/zips/caption_datasets.zip" "*.json" -d "$target/caption_datasets"
if ($status != 0) then
    echo "error: unzipping $target/zips/caption_datasets.zip failed"
    exit 1
endif

echo ""
echo "Done. The zips in $target/zips can be deleted now to free about 20 GB."
echo "Next, pack the images and captions (Karpathy's filepath is train2014/ or val2014/):"
echo "    python create_input_files.py --dataset coco --karpathy-json $target/caption_datasets/dataset_coco.json --image-folder $target/coco --output-folder $target/coco_packed"
