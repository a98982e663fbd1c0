/* SPDX-License-Identifier: GPL-2.0 */
/*
 * XSAVE state: a 64-bit guest turns on CR4.OSXSAVE, sets XCR0 to x87|SSE|AVX, loads a
 * pattern into YMM0, makes a series of exits (each character printed is one), and checks
 * that YMM0 and XCR0 came back intact.
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
_start:
	mov	eax, 1
	cpuid
	bt	ecx, 26			/* XSAVE */
	jnc	no_avx
	bt	ecx, 28			/* AVX */
	jnc	no_avx
	mov	rax, cr4
	or	rax, (1 << 18) | (1 << 9) | (1 << 10)	/* OSXSAVE, OSFXSR, OSXMMEXCPT */
	mov	cr4, rax
	mov	eax, 1
	cpuid
	bt	ecx, 27			/* OSXSAVE now reported */
	jnc	fail
	xor	ecx, ecx
	mov	eax, 7
	xor	edx, edx
	xsetbv
	vmovdqu	ymm0, [rip + pattern]
	lea	rsi, [rip + msg]
	call	puts			/* one exit per character */
	vmovdqu	ymm1, [rip + pattern]
	vxorps	ymm2, ymm0, ymm1
	vptest	ymm2, ymm2
	jnz	fail
	xor	ecx, ecx
	xgetbv
	cmp	eax, 7
	jne	fail
	lea	rsi, [rip + ok]
	call	puts
	mov	al, 0x2b
	out	0xf4, al
	hlt
no_avx:
	lea	rsi, [rip + noavx]
	call	puts
	mov	al, 0x2c
	out	0xf4, al
	hlt
fail:
	lea	rsi, [rip + bad]
	call	puts
	mov	al, 1
	out	0xf4, al
	hlt
puts:
	mov	dx, 0x3f8
1:	lodsb
	test	al, al
	jz	2f
	out	dx, al
	jmp	1b
2:	ret

	.data
	.balign	32
pattern: .quad	0x0123456789abcdef, 0xfedcba9876543210, 0x1111222233334444, 0x5555666677778888
msg:	.asciz	"avx64: YMM0 loaded, exiting a few times\n"
ok:	.asciz	"YMM0 and XCR0 survived the exits\n"
noavx:	.asciz	"no AVX\n"
bad:	.asciz	"FAILED\n"
