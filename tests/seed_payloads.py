"""Request payloads of the seed (aws-samples/stable-diffusion-on-eks, now
aws-solutions-library-samples/guidance-for-asynchronous-inference-with-stable-diffusion-on-aws),
written out verbatim as Python dicts. Sources, in the seed repository:

- ``V1ALPHA1_T2I``: ``test/v1alpha1/t2i.json`` (release 1.0, 2024-03).
- ``V1ALPHA1_I2I``: ``deploy/DemoUI/payload2.json`` (2023-09), the image-to-image example of the
  v1alpha1 usage page; its input image link is ``IMAGE_LINK_PLACEHOLDER``.
- ``V1ALPHA1_I2I_DOCS``: the usage page ``docs/en/implementation-guide/usage/image-to-image.md``
  (2023-10), which has no ``save_dir``.
- ``V1ALPHA1_T2V``: ``test/v1alpha1/t2v.json``, AnimateDiff's 32 frames as SD WebUI's batch (its
  prompt and negative prompt shortened; every other field as the seed has it).
- ``V1ALPHA2_T2I``: ``test/v1alpha2/t2i.json``.
- ``V1ALPHA2_I2I``: ``test/v1alpha2/i2i.json`` (current form, the link in ``init_images``).
- ``V1ALPHA2_I2I_IMAGE_LINK``: ``test/v1alpha2/i2i.json`` of release 1.0 (link in
  ``alwayson_scripts.image_link``).
- ``V1ALPHA2_EXTRA_SINGLE_IMAGE``, ``V1ALPHA2_PIPELINE``: ``test/v1alpha2/extra-single-image.json``,
  ``test/v1alpha2/pipeline.json``.

The seed's image links point at the internet; tests never fetch them. E2e tests swap in a local
URL with ``with_image_link``. Treat the constants as read-only (``with_image_link`` deep-copies).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from sdfleet.compat.examples import IMAGE_LINK_PLACEHOLDER as IMAGE_LINK_PLACEHOLDER
from sdfleet.compat.examples import V1ALPHA1_I2I as V1ALPHA1_I2I
from sdfleet.compat.examples import V1ALPHA1_T2I as V1ALPHA1_T2I

CAT_WIZARD = "cat wizard, gandalf, lord of the rings, detailed, fantasy, cute, adorable, Pixar, Disney, 8k"
SEED_IMAGE_LINK = (
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/cat.png"
)


V1ALPHA1_T2V: dict[str, Any] = {
    "alwayson_scripts": {
        "task": "text-to-image",
        "sd_model_checkpoint": "sd_xl_turbo_1.0.safetensors",
        "id_task": "gif1",
        "uid": "gif1",
        "save_dir": "outputs",
        "AnimateDiff": {
            "args": [
                {
                    "batch_size": 16,
                    "closed_loop": "N",
                    "enable": True,
                    "format": ["GIF"],
                    "fps": 8,
                    "interp": "Off",
                    "interp_x": 10,
                    "last_frame": None,
                    "latent_power": 1,
                    "latent_scale": 32,
                    "loop_number": 0,
                    "model": "mm_sd15_v3.safetensors",
                    "overlap": -1,
                    "stride": 1,
                    "video_length": 32,
                }
            ]
        },
    },
    "batch_size": 32,
    "cfg_scale": 7,
    "height": 512,
    "negative_prompt": "(worst quality:1.2), (low quality:1.2), watermark",
    "prompt": "a cat walking in a desert, cactus",
    "steps": 20,
    "width": 512,
}

V1ALPHA1_I2I_DOCS: dict[str, Any] = {
    "alwayson_scripts": {
        "task": "image-to-image",
        "image_link": IMAGE_LINK_PLACEHOLDER,
        "id_task": "31311",
        "sd_model_checkpoint": "revAnimated_v122.safetensors",
        "uid": "456",
    },
    "prompt": "A fantasy landscape, trending on artstation, mystical sky",
    "steps": 16,
    "width": 512,
    "height": 512,
}

V1ALPHA2_T2I: dict[str, Any] = {
    "task": {
        "metadata": {
            "id": "test-t2i",
            "runtime": "sdruntime",
            "tasktype": "text-to-image",
            "prefix": "output",
            "context": "",
        },
        "content": {"alwayson_scripts": {}, "prompt": "A dog", "steps": 16, "width": 512, "height": 512},
    }
}

V1ALPHA2_I2I: dict[str, Any] = {
    "task": {
        "metadata": {
            "id": "test-i2i",
            "runtime": "sdruntime",
            "tasktype": "image-to-image",
            "prefix": "output",
            "context": "",
        },
        "content": {
            "alwayson_scripts": {},
            "init_images": [SEED_IMAGE_LINK],
            "prompt": CAT_WIZARD,
            "steps": 16,
            "width": 512,
            "height": 512,
        },
    }
}

V1ALPHA2_I2I_IMAGE_LINK: dict[str, Any] = {
    "task": {
        "metadata": {
            "id": "test-i2i",
            "runtime": "sdruntime",
            "tasktype": "image-to-image",
            "prefix": "output",
            "context": "",
        },
        "content": {
            "alwayson_scripts": {"image_link": SEED_IMAGE_LINK},
            "prompt": CAT_WIZARD,
            "steps": 16,
            "width": 512,
            "height": 512,
        },
    }
}

V1ALPHA2_EXTRA_SINGLE_IMAGE: dict[str, Any] = {
    "task": {
        "metadata": {
            "id": "test-extra",
            "runtime": "sdruntime",
            "tasktype": "extra-single-image",
            "prefix": "output",
            "context": "",
        },
        "content": {
            "resize_mode": 0,
            "show_extras_results": False,
            "gfpgan_visibility": 0,
            "codeformer_visibility": 0,
            "codeformer_weight": 0,
            "upscaling_resize": 4,
            "upscaling_resize_w": 512,
            "upscaling_resize_h": 512,
            "upscaling_crop": False,
            "upscaler_1": "R-ESRGAN 4x+",
            "upscaler_2": "None",
            "extras_upscaler_2_visibility": 0,
            "upscale_first": False,
            "image": SEED_IMAGE_LINK,
        },
    }
}


def _node(class_type: str, title: str, **inputs: Any) -> dict[str, Any]:
    return {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}


V1ALPHA2_PIPELINE: dict[str, Any] = {
    "task": {
        "metadata": {
            "id": "test-pipeline",
            "runtime": "sdruntime",
            "tasktype": "pipeline",
            "prefix": "output",
            "context": "",
        },
        "content": {
            "3": _node(
                "KSampler",
                "KSampler",
                seed=89465186141685,
                steps=20,
                cfg=8,
                sampler_name="euler",
                scheduler="normal",
                denoise=1,
                model=["4", 0],
                positive=["6", 0],
                negative=["7", 0],
                latent_image=["5", 0],
            ),
            "4": _node(
                "CheckpointLoaderSimple", "Load Checkpoint", ckpt_name="v1-5-pruned-emaonly.safetensors"
            ),
            "5": _node("EmptyLatentImage", "Empty Latent Image", width=512, height=512, batch_size=1),
            "6": _node(
                "CLIPTextEncode",
                "CLIP Text Encode (Prompt)",
                text="beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
                clip=["4", 1],
            ),
            "7": _node("CLIPTextEncode", "CLIP Text Encode (Prompt)", text="text, watermark", clip=["4", 1]),
            "8": _node("VAEDecode", "VAE Decode", samples=["3", 0], vae=["4", 2]),
            "9": _node("SaveImage", "Save Image", filename_prefix="ComfyUI", images=["8", 0]),
        },
    }
}


def with_image_link(payload: dict[str, Any], url: str) -> dict[str, Any]:
    """A deep copy of ``payload`` with every seed image link replaced by ``url``."""
    text = json.dumps(payload)
    for link in (IMAGE_LINK_PLACEHOLDER, SEED_IMAGE_LINK):
        text = text.replace(json.dumps(link), json.dumps(url))
    result: dict[str, Any] = json.loads(text)
    return result


def copy_of(payload: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(payload)


def lambda_message(
    version: str, payload: dict[str, Any], bucket: str = "outputbucket"
) -> tuple[str, dict[str, str]]:
    """The SNS message and attributes the seed's input Lambda publishes for ``payload``."""
    if version == "v1alpha1":
        scripts = payload["alwayson_scripts"]
        content = copy.deepcopy(payload)
        content["s3_output_path"] = f"{bucket}/{scripts['save_dir']}/{scripts['id_task']}"
        meta = {
            "id": scripts["id_task"],
            "runtime": "legacy",
            "tasktype": scripts["task"],
            "prefix": scripts["save_dir"],
            "context": {},
        }
        return json.dumps({"metadata": meta, "content": content}), {
            "sd_model_checkpoint": scripts["sd_model_checkpoint"]
        }
    task = payload["task"]
    return json.dumps(task), {"runtime": task["metadata"]["runtime"]}


def sns_envelope(
    message: str,
    attributes: dict[str, str],
    topic: str = "sdoneks-input",
    message_id: str = "6e3b8d2c-0f7a-4a39-9d0e-2f4c7f0b5a11",
) -> bytes:
    """An SQS body as SNS delivers it to a queue subscribed without RawMessageDelivery."""
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": message_id,
            "TopicArn": f"arn:aws:sns:us-east-1:123456789012:{topic}",
            "Message": message,
            "Timestamp": "2024-03-18T12:00:00.000Z",
            "SignatureVersion": "1",
            "Signature": "EXAMPLE",
            "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-EXAMPLE.pem",
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=EXAMPLE",
            "MessageAttributes": {k: {"Type": "String", "Value": v} for k, v in attributes.items()},
        }
    ).encode()
